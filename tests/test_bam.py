"""BAM upcycling (method=bam) and BTX (method=merge), streamed one layer at a time: the
experts are the sources' own weights as transformers holds them, identical sources give
back the dense model, models trained here merge, train, evaluate and analyse, and bad
input is one line with nothing written. (BAM of four copies of the embedded SmolLM2 keeps
its perplexity: a run of the binary recorded in docs/benchmarks.md, about a minute, so
outside the suite; the same property is tested here on every layer of a tiny model.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import hf_models
import subproc
from configs import analyze as analyze_config
from configs import evaluate as eval_config
from configs import train as train_config
from configs import upcycle as upcycle_config
from moe_jax import checkpoint, runs, sharding, sweep
from moe_jax.convert import load
from moe_jax.data import corpus
from moe_jax.train import init_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(tmp_path, name, seed=0, **kw):
  model = hf_models.make_model("llama", seed=seed, **kw)
  path = tmp_path / name
  model.save_pretrained(str(path))
  return str(path), model


def _upcycle(workdir, sources, arg="method=bam", **overrides):
  c = upcycle_config.get_config(f"{arg},experts={len(sources)}")
  c = sweep.apply(c, {"merge_sources": ",".join(sources), "eval_windows": 0, **overrides})
  return runs.upcycle(c, str(workdir))


def _sd(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shared_kv", [False, True])
def test_bam_experts_are_the_sources_weights(tmp_path, shared_kv):
  srcs = [_save(tmp_path, f"src{i}", seed=i) for i in range(3)]
  _upcycle(tmp_path / "bam", [p for p, _ in srcs], **{"moa.shared_kv": shared_kv})
  meta = checkpoint.read_meta(str(tmp_path / "bam"))
  cfg = load.open_source(str(tmp_path / "bam")).cfg
  assert (cfg.moa.num_experts, cfg.moa.top_k, cfg.moa.shared_kv) == (3, 0, shared_kv)
  assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.router) == (3, 1, "topk_softmax")
  prov = meta["provenance"]
  assert prov["merge_sources"] == [p for p, _ in srcs] and len(set(prov["source_sha256"])) == 3
  model = checkpoint.load(str(tmp_path / "bam"))
  sds = [_sd(m) for _, m in srcs]
  d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  mean = lambda name: np.mean([sd[name] for sd in sds], 0)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a[...]), b, rtol=0, atol=1e-6)
  close(model.embed, mean("model.embed_tokens.weight"))
  close(model.final_norm, mean("model.norm.weight"))
  close(model.lm_head, mean("lm_head.weight").T)
  for i, layer in enumerate(model.layers):
    hf = f"model.layers.{i}."
    close(layer.attn_norm, mean(hf + "input_layernorm.weight"))
    close(layer.mlp_norm, mean(hf + "post_attention_layernorm.weight"))
    for j, sd in enumerate(sds):
      a = hf + "self_attn."
      close(layer.attn.wq[j], sd[a + "q_proj.weight"].T.reshape(d, h, k))
      close(layer.attn.wo[j], sd[a + "o_proj.weight"].T.reshape(h, k, d))
      if not shared_kv:
        close(layer.attn.wk[j], sd[a + "k_proj.weight"].T.reshape(d, g, k))
        close(layer.attn.wv[j], sd[a + "v_proj.weight"].T.reshape(d, g, k))
      for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        close(getattr(layer.mlp, ours)[j], sd[f"{hf}mlp.{theirs}.weight"].T)
    if shared_kv:
      close(layer.attn.wk, mean(hf + "self_attn.k_proj.weight").T.reshape(d, g, k))
      close(layer.attn.wv, mean(hf + "self_attn.v_proj.weight").T.reshape(d, g, k))
    for router in (layer.attn.router[...], layer.mlp.router[...]):  # drawn fresh, N(0, 0.02)
      assert router.shape == (d, 3) and 0.01 < float(np.std(router)) < 0.03


@pytest.mark.parametrize("shared_kv,moa_top_k", [(False, 0), (True, 0), (False, 2)])
def test_bam_of_identical_sources_is_the_dense_model(tmp_path, shared_kv, moa_top_k):
  path, model = _save(tmp_path, "src")
  _upcycle(tmp_path / "bam", [path] * 4, **{"moa.shared_kv": shared_kv, "moa.top_k": moa_top_k})
  tokens = np.random.default_rng(0).integers(0, 97, (2, 11))
  logits, aux = checkpoint.load(str(tmp_path / "bam"))(tokens)
  np.testing.assert_allclose(np.asarray(logits), hf_models.logits(model, tokens), rtol=0,
                             atol=2e-5)
  assert sorted(aux["moa"]) == [0, 1] and sorted(aux["moe"]) == [0, 1]


def test_merge_streams_layers_and_averages_the_rest(tmp_path):
  """BTX: FFN experts from the sources, attention averaged (or `merge_base`'s)."""
  srcs = [_save(tmp_path, f"src{i}", seed=i) for i in range(2)]
  _upcycle(tmp_path / "btx", [p for p, _ in srcs], "method=merge,topk=1")
  _upcycle(tmp_path / "base1", [p for p, _ in srcs], "method=merge,topk=1", merge_base=1)
  sds = [_sd(m) for _, m in srcs]
  q = "model.layers.1.self_attn.q_proj.weight"
  wq = lambda name: np.asarray(checkpoint.load(str(tmp_path / name)).layers[1].attn.wq[...])
  cfg = load.open_source(str(tmp_path / "btx")).cfg
  assert cfg.moa is None
  shape = (cfg.d_model, cfg.n_heads, cfg.head_dim)
  np.testing.assert_allclose(wq("btx"), np.mean([sd[q] for sd in sds], 0).T.reshape(shape),
                             atol=1e-6)
  np.testing.assert_allclose(wq("base1"), sds[1][q].T.reshape(shape), atol=1e-6)


def _texts(tmp_path) -> list[str]:
  """Three training texts: Python code, English prose, and the two interleaved."""
  code = corpus.stdlib_documents("train")[:24]
  prose = [p for p in corpus.embedded_eval_text().split("\n\n") if len(p) > 200][:200]
  prose = ["\n\n".join(prose[i:i + 8]) for i in range(0, len(prose), 8)]
  out = []
  for name, docs in (("code", code), ("prose", prose), ("mixed", code[::2] + prose[::2])):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out.append(str(path))
  return out


def _train(workdir, init, data, steps=2, **overrides):
  c = train_config.get_config("scratch,runlocal,method=none")
  c = sweep.apply(c, {"init": init, "data.source": data, "scratch.tokenizer": "bpe:384",
                      "scratch.block": "parallel", "loop.steps": steps, "loop.seq_len": 32,
                      "loop.batch_size": 2, "loop.eval_batches": 0, "loop.ckpt_every": steps,
                      "mesh.fsdp": 1, **overrides})
  return runs.train(c, str(workdir))


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
  """(tmp dir, texts, branches): a parallel-block seed trained from scratch (with its own
  small BPE vocabulary), and three branches trained on from it on different texts."""
  tmp_path = tmp_path_factory.mktemp("branched")
  texts = _texts(tmp_path)
  _train(tmp_path / "seed", "scratch", texts[2])
  branches = []
  for i, text in enumerate(texts):
    _train(tmp_path / f"branch{i}", str(tmp_path / "seed"), text, **{"loop.seed": i})
    branches.append(str(tmp_path / f"branch{i}"))
  return tmp_path, texts, branches


def test_bam_of_three_trained_models_trains_evaluates_and_is_analysed(branched):
  """BAM's setup in miniature: the branches merged by BAM with shared KV, then trained
  on, evaluated (with a completion) and analysed through the library's jobs."""
  tmp_path, texts, branches = branched
  _upcycle(tmp_path / "bam", branches, **{"moa.shared_kv": True})
  cfg = load.open_source(str(tmp_path / "bam")).cfg
  assert cfg.block == "parallel" and cfg.moa.shared_kv and cfg.moe.top_k == 1
  assert cfg.vocab_size == load.open_source(str(tmp_path / "seed")).cfg.vocab_size
  last = _train(tmp_path / "train", str(tmp_path / "bam"), texts[2], **{"optim.lr": 1e-3})
  assert np.isfinite(last["loss"]) and "moa/layer00/router_entropy" in last
  assert 0 < last["moa/layer01/router_entropy"] <= np.log(3) + 1e-6
  c = eval_config.get_config()
  c.update(checkpoint=str(tmp_path / "train"), max_windows=1, seq_len=32, batch_size=1,
           prompt="def f(x):", max_new_tokens=4)
  result = runs.evaluate(c, str(tmp_path / "eval"))
  assert np.isfinite(result["ppl"]) and isinstance(result["completion"], str)
  c = analyze_config.get_config("runlocal")
  c.update(checkpoint=str(tmp_path / "train"), seq_len=32, windows=1, domain_windows=0)
  result = runs.analyze(c, str(tmp_path / "analysis"))
  assert result["reference"] is None and len(result["layers"]) == cfg.n_layers
  assert os.path.isfile(tmp_path / "analysis" / "report.md")


@pytest.mark.parametrize("method,shared_kv", [("merge", False), ("bam", False), ("bam", True)])
def test_train_merges_on_the_fly_as_the_upcycle_binary_does(branched, tmp_path, method,
                                                             shared_kv):
  """train with upcycle.method=merge|bam and a list of dense inits builds, before its first
  step, exactly the model that experiments.upcycle writes from the same sources (routers
  drawn from the same seed), then trains from it and records every source."""
  _, texts, branches = branched
  _upcycle(tmp_path / "offline", branches, f"method={method},topk=1",
           **{"moa.shared_kv": shared_kv})
  c = train_config.get_config(f"runlocal,method={method},experts=3,topk=1")
  c = sweep.apply(c, {"init": ",".join(branches), "layers": "all", "moa.shared_kv": shared_kv,
                      "mesh.fsdp": 1})
  plan = init_plan.plan(c, str(tmp_path / "online"))
  assert plan.kind == "merge" and plan.cfg == load.open_source(str(tmp_path / "offline")).cfg
  online = nnx.to_flat_state(nnx.state(plan.build(sharding.make_mesh(), c.loop.seed)))
  offline = dict(nnx.to_flat_state(nnx.state(checkpoint.load(str(tmp_path / "offline")))))
  assert len(online) == len(offline)
  for path, v in online:
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(offline[path][...]),
                                  err_msg=str(path))
  last = _train(tmp_path / "online", ",".join(branches), texts[2],
                **{"upcycle.method": method, "upcycle.num_experts": 3, "upcycle.top_k": 1,
                   "layers": "all", "moa.shared_kv": shared_kv})
  assert np.isfinite(last["loss"]) and ("moa/layer00/router_entropy" in last) == (method == "bam")
  prov = load.open_source(str(tmp_path / "online")).meta["provenance"]
  assert [p.startswith(b) for p, b in zip(prov["merge_sources"], branches)] == [True] * 3
  assert [i["source"] for i in prov["merge_inits"]] == prov["merge_sources"]
  with pytest.raises(ValueError, match=r"config.upcycle.num_experts=3, but config.init names 2 "):
    init_plan.plan(sweep.apply(c, {"init": ",".join(branches[:2])}), str(tmp_path / "bad"))


def _bad(tmp_path, *sources, **overrides):
  with pytest.raises(ValueError) as e:
    _upcycle(tmp_path / "out", list(sources), **overrides)
  assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
  return str(e.value)


def test_bad_merges_are_one_line_and_write_nothing(tmp_path):
  a, _ = _save(tmp_path, "a")
  wide, _ = _save(tmp_path, "wide", intermediate_size=128)
  kv4, _ = _save(tmp_path, "kv4", num_key_value_heads=4)
  assert f"{wide}: merge source 1 has ffn_dim=128, source 0 ({a}) 96" in _bad(tmp_path, a, wide)
  assert (f"{kv4}: merge source 1 has 4 KV heads, source 0 ({a}) 2: moa.shared_kv averages"
          in _bad(tmp_path, a, kv4, **{"moa.shared_kv": True}))
  assert "merge source 1 has n_kv_heads=4" in _bad(tmp_path, a, kv4)
  assert ("config.upcycle.num_experts=3, but config.merge_sources names 2 checkpoints"
          in _bad(tmp_path, a, a, **{"upcycle.num_experts": 3}))
  assert ("config.block='parallel': " + a + " is a sequential model"
          in _bad(tmp_path, a, a, block="parallel"))


def test_binary_refuses_a_source_count_in_one_line(tmp_path):
  a, _ = _save(tmp_path, "a")
  r = subprocess.run([sys.executable, "-m", "experiments.upcycle", f"--workdir={tmp_path / 'out'}",
                      "--config=configs/upcycle.py:method=bam,experts=4",
                      f"--config.merge_sources={a},{a}", "--config.eval_windows=0"],
                     cwd=ROOT, env=subproc.env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and r.stderr.strip().splitlines() == [
      "error: config.upcycle.num_experts=4, but config.merge_sources names 2 checkpoints: "
      "expected one per expert"], r.stderr
  assert sorted(os.listdir(tmp_path)) == ["a"]


def test_export_refuses_attention_experts_in_one_line(tmp_path):
  from moe_jax.convert import export_hf  # pylint: disable=g-import-not-at-top
  a, _ = _save(tmp_path, "a")
  _upcycle(tmp_path / "bam", [a, a])
  with pytest.raises(ValueError, match="attention experts .BAM., which no Hugging Face format"):
    export_hf.export(str(tmp_path / "bam"), str(tmp_path / "hf_out"), "mixtral")
  assert not (tmp_path / "hf_out").exists()
  nnx.state(checkpoint.load(str(tmp_path / "bam")))  # the checkpoint itself is intact


def test_sources_with_different_vocabularies_are_refused():
  """Averaged embeddings need one vocabulary (bare HF directories, without a tokenizer,
  are not compared)."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from moe_jax.upcycle import merge  # pylint: disable=g-import-not-at-top

  def src(path, vocab):
    tok = SimpleNamespace(tok=SimpleNamespace(get_vocab=lambda: vocab))
    return SimpleNamespace(path=path, has_tokenizer=lambda: vocab is not None,
                           tokenizer=lambda: tok)

  merge._check_tokenizers([src("a", {"x": 0}), src("b", None), src("c", {"x": 0})])
  msg = r"^c: merge source 2's tokenizer differs from source 0's \(a\)"
  with pytest.raises(ValueError, match=msg):
    merge._check_tokenizers([src("a", {"x": 0}), src("b", None), src("c", {"y": 0})])
