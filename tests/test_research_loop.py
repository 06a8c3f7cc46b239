"""The research loop: a train workdir (or one of its steps) is a checkpoint that evaluate,
export_hf, upcycle and train read, with its tokenizer and provenance; bad paths are one
line; sweeps chain runs."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx, traverse_util

import hf_models
import subproc
from configs import chain_upcycle, evaluate as eval_config, train as train_config
from configs import upcycle as upcycle_config, upcycle_vs_dense
from moe_jax import checkpoint, evaluate as eval_lib, runs, sharding, sweep
from moe_jax import tokenizer as tokenizer_lib
from moe_jax.convert import export_hf, gguf, load
from moe_jax.data import pipeline
from moe_jax.models import llama
from moe_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = subproc.env()  # one CPU device
TINY = dict(steps=4, batch_size=2, seq_len=32, log_every=1, eval_every=100, eval_batches=1,
            ckpt_every=2, keep=3)


def _train_config(method: str, **loop):
  c = train_config.get_config(f"scratch,runlocal,method={method},lr=0.01")
  c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  c.data.max_docs = 8
  c.loop.update(**dict(TINY, **loop))
  c.optim.update(total_steps=4, warmup_steps=1)
  if method != "none":  # all layers MoE, trained with capacity (Mixtral-exportable router)
    c.moe.update(backend="capacity", capacity_factor=1.0)
  return c


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A tiny scratch MoE and a dense model, each 4 steps; the final models in memory."""
  root = tmp_path_factory.mktemp("loop")
  out = {}
  for name, method in (("moe", "copy"), ("dense", "none")):
    model, _ = runs.train_model(_train_config(method), str(root / name))
    out[name] = (str(root / name), model)
  return out


def _eval(checkpoint, workdir, **moe):
  c = eval_config.get_config()
  c.update(checkpoint=checkpoint, seq_len=32, max_windows=4)
  c.moe.update(**moe)
  return runs.evaluate(c, workdir)


def test_evaluate_workdir_equals_final_params(trained, tmp_path):
  workdir, model = trained["moe"]
  got = _eval(workdir, str(tmp_path / "e"))
  windows = eval_lib.make_windows(load.load_tokenizer(workdir).encode(
      runs.eval_text("")[0]), 32, 4)
  want = eval_lib.perplexity(model, windows)["eval_loss"]
  assert got["kind"] == "train" and got["step"] == 4 and got["backend"] == "capacity"
  assert abs(got["eval_loss"] - want) <= 1e-6


def test_evaluate_overrides_the_dispatch(trained, tmp_path):
  workdir, model = trained["moe"]
  text = runs.eval_text("")[0]
  windows = eval_lib.make_windows(load.load_tokenizer(workdir).encode(text), 32, 4)
  dropless = _eval(workdir, str(tmp_path / "a"), backend="dropless")
  tight = _eval(workdir, str(tmp_path / "b"), capacity_factor=0.25)
  ref = llama_with(model, backend="dropless")
  assert dropless["backend"] == "dropless"
  assert abs(dropless["eval_loss"] - eval_lib.perplexity(ref, windows)["eval_loss"]) <= 1e-6
  ref = llama_with(model, capacity_factor=0.25)
  assert abs(tight["eval_loss"] - eval_lib.perplexity(ref, windows)["eval_loss"]) <= 1e-6
  assert abs(tight["eval_loss"] - dropless["eval_loss"]) > 1e-4  # drops change the loss


def llama_with(model, **moe):
  """`model`'s params under other MoE dispatch settings."""
  cfg = model.cfg.replace(moe=dataclasses.replace(model.cfg.moe, **moe))
  graphdef, state = nnx.split(llama.abstract(cfg))
  nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model)))
  return nnx.merge(graphdef, state)


def test_export_workdir_matches_transformers(trained, tmp_path):
  workdir, model = trained["moe"]
  out = export_hf.export(workdir, str(tmp_path / "mixtral"), "mixtral")
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(ref).__name__ == "MixtralForCausalLM"
  tokens = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (2, 16))
  ours = np.asarray(llama_with(model, backend="dropless")(jnp.asarray(tokens))[0])
  np.testing.assert_allclose(hf_models.logits(ref, tokens), ours, atol=1e-4, rtol=0)
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_upcycle_a_trained_dense_workdir_preserves_it(trained, tmp_path):
  workdir, dense = trained["dense"]
  c = upcycle_config.get_config("method=copy,experts=4,topk=2")
  c.update(source=workdir, eval_windows=0)
  runs.upcycle(c, str(tmp_path / "up"))
  src = load.open_source(str(tmp_path / "up"))
  init = src.meta["provenance"]["init"]
  assert init["kind"] == "train" and init["step"] == 4 and len(init["sha256"]) == 64
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, dense.cfg.vocab_size, (2, 16)))
  np.testing.assert_allclose(np.asarray(src.model()(tokens)[0]), np.asarray(dense(tokens)[0]),
                             atol=1e-5, rtol=0)


def test_train_from_a_moe_workdir_starts_from_its_params(trained, tmp_path):
  workdir, moe = trained["moe"]
  c = _train_config("copy", steps=1)
  c.init = workdir
  runs.train(c, str(tmp_path / "more"))
  with open(tmp_path / "more" / "metrics.jsonl") as f:
    first = json.loads(f.readline())["loss"]
  tok = load.load_tokenizer(workdir)
  train_docs, _ = runs.data_documents(c, runs.data_texts(c), tok)
  batch = pipeline.to_batch(next(iter(pipeline.packed_dataset(
      train_docs, c.loop.seq_len, c.loop.batch_size, c.loop.seed))))
  key = jax.random.fold_in(jax.random.key(c.loop.seed), 0)
  want = float(step_lib.loss_fn(moe, {k: jnp.asarray(v) for k, v in batch.items()},
                                train=True, key=key)[0])
  assert abs(first - want) <= 1e-5, (first, want)
  meta = load.open_source(str(tmp_path / "more")).meta
  assert meta["provenance"]["init"]["source"] == os.path.join(workdir, "checkpoints", "4")
  tokens = 2 * 32
  assert meta["tokens_seen"] == tokens and meta["tokens_seen_total"] == 5 * tokens


def test_provenance_travels_with_the_run(trained):
  src = load.open_source(trained["moe"][0])
  prov = src.meta["provenance"]
  assert src.meta["step"] == 4 and src.meta["tokens_seen"] == 4 * 2 * 32
  assert prov["init"] == {"source": "scratch"} and prov["upcycle"]["num_experts"] == 4
  assert prov["train_config"]["loop"]["steps"] == 4 and "jax" in prov["versions"]
  learned = tokenizer_lib.train_bpe(runs.data_texts(_train_config("copy"))[0], 1024)
  assert src.tokenizer().tok.to_str() == learned.tok.to_str()  # runlocal: 'bpe:1024'
  assert src.cfg.vocab_size == 1024 and src.tokenizer().eos_id == 0


def test_naming_a_step_gives_that_step(trained, tmp_path):
  """Steps 2 and 4 of a run differ; step 2 equals a run stopped at 2 (same schedule)."""
  workdir, _ = trained["dense"]
  short = str(tmp_path / "short")
  runs.train(_train_config("none", steps=2), short)
  at2 = load.open_source(os.path.join(workdir, "checkpoints", "2")).model()
  at4 = load.open_source(workdir).model()
  ref = load.open_source(short).model()
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(at2)),
               nnx.to_pure_dict(nnx.state(ref)))
  assert not np.array_equal(at2.embed[...], at4.embed[...])


def _half_written(workdir, tmp_path):
  """A copy of `workdir` with step 6 mid-save (orbax temp dir) and step 8 uncommitted."""
  bad = tmp_path / "bad"
  shutil.copytree(workdir, bad)
  ckpts = bad / "checkpoints"
  shutil.copytree(ckpts / "4", ckpts / "6.orbax-checkpoint-tmp-1796000000")
  shutil.copytree(ckpts / "4", ckpts / "8")
  os.remove(ckpts / "8" / "_CHECKPOINT_METADATA")
  return bad


def test_a_half_written_step_is_never_read(trained, tmp_path):
  bad = _half_written(trained["dense"][0], tmp_path)
  assert load.open_source(str(bad)).path == str(bad / "checkpoints" / "4")


def _binary(module, *args):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=300)


def test_bad_checkpoints_are_one_line(trained, tmp_path):
  bad = _half_written(trained["dense"][0], tmp_path)
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  cases = [
      (str(empty), "train workdir has no finished step"),
      (str(bad / "checkpoints" / "3"), "step 3 does not exist (finished steps: [2, 4])"),
      (str(bad / "checkpoints" / "6"), "step 6 is still being written"),
      (str(bad / "checkpoints" / "8"), "step 8 is not a finished checkpoint"),
  ]
  for path, msg in cases:  # through the library: every tool reads with open_source
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(msg)):
      load.open_source(path)
  c = _train_config("none")
  c.init = cases[0][0]
  with pytest.raises(ValueError, match=re.escape(cases[0][1])):  # train's init, too
    runs.train(c, str(tmp_path / "t"))
  assert not (tmp_path / "t").exists()
  out = tmp_path / "out"
  for module, args in (("evaluate", [f"--config.checkpoint={cases[2][0]}", f"--workdir={out}"]),):
    r = _binary(module, *args)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0], r.stderr
    assert not out.exists()


def _sweep_base(config):
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  config.data.max_docs = 8
  config.loop.update(batch_size=2, seq_len=32, log_every=1, eval_batches=1)
  config.scratch.update(n_layers=1)
  return config


def test_sweep_chain_dense_then_upcycle(tmp_path):
  """One command: dense n steps, then that checkpoint upcycled (and dense) m more."""
  arg = "runlocal,scratch,n=2,m=2,experts=2"  # n = m: the two dense runs share one compile
  base = _sweep_base(chain_upcycle.get_config(arg))
  order = [sweep.run_name(o) for o in sweep.order(chain_upcycle.sweep(arg))]
  assert order == ["dense", "moe", "dense_more"]
  rows = sweep.run_sweep(base, chain_upcycle.sweep(arg), str(tmp_path), runs.train)
  assert [r["run"] for r in rows] == order
  moe = load.open_source(str(tmp_path / "moe"))
  assert moe.is_moe and moe.meta["step"] == 2
  assert moe.meta["provenance"]["init"]["source"] == str(tmp_path / "dense" / "checkpoints" / "2")
  assert moe.meta["tokens_seen_total"] == (2 + 2) * 2 * 32
  assert not load.open_source(str(tmp_path / "dense_more")).is_moe


def test_sweep_upcycled_vs_dense_from_the_same_start(tmp_path):
  """The arms start from one checkpoint and see the same tokens (the chain test above
  runs the same machinery end to end)."""
  arg = "runlocal,scratch,steps=2,pretrain=2,experts=2"
  base = upcycle_vs_dense.get_config(arg)
  ordered = sweep.order(upcycle_vs_dense.sweep(arg))
  assert [sweep.run_name(o) for o in ordered] == ["seed", "upcycled", "dense"]
  arms = [sweep.apply(base, sweep.resolve(o, str(tmp_path))) for o in ordered[1:]]
  assert {a.init for a in arms} == {str(tmp_path / "seed")}
  assert [a.upcycle.method for a in arms] == ["copy", "none"]
  assert arms[0].loop == arms[1].loop and arms[0].data == arms[1].data


def test_sweep_order_errors():
  with pytest.raises(ValueError, match="init=run:nope names no run"):
    sweep.order([{"name": "a", "init": "run:nope"}])
  with pytest.raises(ValueError, match="a -> b -> a form a cycle"):
    sweep.order([{"name": "a", "init": "run:b"}, {"name": "b", "init": "run:a"}])
  with pytest.raises(ValueError, match="two runs named 'a'"):
    sweep.order([{"name": "a"}, {"name": "a"}])


def test_a_train_step_loads_sharded_like_one_device(trained):
  """The step restores straight onto a mesh (each param where its logical names say)."""
  workdir, model = trained["moe"]
  mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
  got = load.open_source(workdir).model(mesh)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(got)),
               nnx.to_pure_dict(nnx.state(model)))
  w = got.layers[0].mlp.w_up
  assert w[...].sharding == sharding.variable_sharding(w, mesh)
  assert len(w[...].sharding.device_set) == 8


def test_one_layer_reads_like_the_whole_model(trained, tmp_path):
  """Source.layer(i) from train steps, moe_jax, HF and GGUF checkpoints equals layer i of
  the whole model (what layer-by-layer analyses stream)."""
  workdir, model = trained["moe"]
  checkpoint.save(str(tmp_path / "ckpt"), model)
  hf_dir = export_hf.export(workdir, str(tmp_path / "hf"), "mixtral")
  want = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))["layers"][1])
  for path in (workdir, str(tmp_path / "ckpt"), hf_dir):
    got = load.open_source(path).layer(1)
    assert sorted(got) == sorted(want), path
    for p, w in want.items():
      np.testing.assert_allclose(got[p], np.asarray(w), atol=1e-6, rtol=0, err_msg=str(p))
  src = load.open_source("")
  ffn = src.layer(3)[("mlp", "w_gate")]
  (name, ref), = gguf.iter_gguf_tensors(src.path, src.header, "blk.3.ffn_gate.")
  assert name == "model.layers.3.mlp.gate_proj.weight"
  np.testing.assert_array_equal(ffn, ref.T)
  with pytest.raises(ValueError, match="layer 30 out of range"):
    src.layer(30)
