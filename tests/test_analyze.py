"""The analysis binary end to end on a small dense model trained here and upcycled: known
answers for copy and drop upcycling, the report's figures, analysis.json's names, and
one-line errors that write nothing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import subproc

from configs import analyze as analyze_config, train as train_config
from configs import upcycle as upcycle_config
from moe_jax import runs
from moe_jax.analysis import static
from moe_jax.convert import gguf, load
from moe_jax.upcycle import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = subproc.env()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
  """A dense scratch model trained 3 steps, and its copy and drop (r=0.5) upcycles."""
  root = tmp_path_factory.mktemp("analyze")
  c = train_config.get_config("scratch,runlocal,method=none,lr=0.01")
  c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  c.data.max_docs = 8
  c.loop.update(steps=3, batch_size=2, seq_len=32, eval_batches=0, ckpt_every=3)
  runs.train(c, str(root / "dense"))
  out = {"dense": str(root / "dense")}
  for method in ("copy", "drop"):
    u = upcycle_config.get_config(f"method={method},experts=4,topk=2")
    u.update(source=out["dense"], eval_windows=0)
    runs.upcycle(u, str(root / method))
    out[method] = str(root / method)
  return out


def _analyze(checkpoint, workdir, **kw):
  c = analyze_config.get_config()
  c.update(**{**dict(checkpoint=checkpoint, windows=2, seq_len=64, domain_windows=1), **kw})
  return runs.analyze(c, workdir)


def test_copy_experts_are_the_base_and_the_report(models, tmp_path):
  r = _analyze(models["copy"], str(tmp_path / "a"), detail_layers="all")
  assert r["reference"] == os.path.join(models["dense"], "checkpoints", "3")  # provenance
  for d in r["layers"].values():
    for m in ("w_gate", "w_up", "w_down"):
      np.testing.assert_allclose(d["weight_cosine"][m], np.ones((5, 5)), atol=1e-6)
      assert all(abs(c - 1) < 1e-6 for c in d["to_base"]["cosine"][f"mlp.{m}"])
      assert d["router_fit"][m]["r2"] < 1e-6  # constant weight similarity: nothing to fit
    np.testing.assert_allclose(d["output_cosine"], np.ones((4, 4)), atol=1e-5)
    np.testing.assert_allclose(d["output_to_reference"], np.ones(4), atol=1e-5)
    assert d["to_base"]["cosine"]["attn.wq"] == pytest.approx(1.0)
    np.testing.assert_allclose(d["neuron_reordered"]["kendall_tau"], np.ones((4, 4)))
    assert abs(sum(d["load"]) - 1) < 1e-6 and 0 <= d["domain_js"] <= 1
  files = os.listdir(tmp_path / "a")
  pngs = [f for f in files if f.endswith(".png")]
  assert len(pngs) >= 6 and all(os.path.getsize(tmp_path / "a" / p) > 5000 for p in pngs)
  text = (tmp_path / "a" / "report.md").read_text()
  assert all(f"]({p})" in text for p in pngs)
  with open(tmp_path / "a" / "analysis.json") as f:
    layer = json.load(f)["layers"]["0"]
  for key in ("weight_cosine", "neuron_reordered", "router_fit", "to_base", "output_cosine",
              "norm_score_counts", "load", "domain_js"):
    assert key in layer, key
  assert set(layer["neuron_reordered"]) == {"cosine", "kendall_tau"}


def test_drop_to_base_cosine_is_as_constructed(models, tmp_path):
  """Drop redraws a fraction r of each expert's neurons from N(mean, std) of the base
  matrix, so cos(expert, base) = ((1 - r) E[a^2] + r mu^2) / E[a^2] for i.i.d. entries,
  = (1 - r) + r mu^2 / (mu^2 + sd^2)."""
  r = _analyze(models["drop"], str(tmp_path / "a"), windows=0)
  dense = load.open_source(models["dense"])
  for i, d in r["layers"].items():
    for m in ("w_gate", "w_up", "w_down"):
      a = dense.layer(int(i))[("mlp", m)]
      mu2, sq = a.mean() ** 2, (a ** 2).mean()
      want = 0.5 + 0.5 * mu2 / sq
      got = d["to_base"]["cosine"][f"mlp.{m}"]
      assert np.allclose(got, want, atol=0.03), (i, m, got, want)
      assert all(c < 0.99 for c in np.asarray(d["weight_cosine"][m])[:4, :4][np.triu_indices(4, 1)])


def _binary(*args):
  return subprocess.run([sys.executable, "-m", "experiments.analyze", *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_line(models, tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("too short")
  out = tmp_path / "out"
  r = _binary(f"--config.checkpoint={models['dense']}", f"--workdir={out}")
  assert r.returncode == 1 and "not an MoE checkpoint" in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
  # the binary's one-line boundary is checked above; the other cases in process
  cases = [(dict(checkpoint=models["copy"], reference=gguf.embedded_gguf_path()),
            "reference is not a dense model of the checkpoint's shape"),
           (dict(checkpoint=models["copy"], text_file=str(short)), "shorter than one window")]
  for kw, msg in cases:
    with pytest.raises(ValueError, match=msg):
      _analyze(workdir=str(out), **kw)
    assert not out.exists()


def _predicted_drop_cosine(a: np.ndarray, dropped: np.ndarray, neuron_axis: int):
  """(mean, sd) of cos(expert, base) for drop: the kept neurons are a's, the `dropped`
  ones x are redrawn from N(mu, sd^2) of all of a, so <expert, a> = |kept|^2 + <x, a_R>
  with mean mu * sum(a_R) and variance sd^2 |a_R|^2, and ||expert||^2 is |kept|^2 +
  n_R (mu^2 + sd^2) to within a relative sqrt(2 / n_R)."""
  a = np.moveaxis(a.astype(np.float64), neuron_axis, 0)  # [F, ...] one neuron per row
  mu, var = a.mean(), a.var()
  kept, a_r = np.delete(a, dropped, axis=0), a[dropped]
  k2 = (kept ** 2).sum()
  norm = np.sqrt((k2 + a_r.size * (mu ** 2 + var)) * (a ** 2).sum())
  return (k2 + mu * a_r.sum()) / norm, np.sqrt(var * (a_r ** 2).sum()) / norm


@pytest.mark.parametrize("layer_id", [0, 29])
def test_smollm2_copy_and_drop_upcycles_analysed_against_their_construction(layer_id):
  """The embedded model's own weights: copy experts are the base (every similarity 1);
  drop (r = 0.5) experts sit at the cosine to the base their construction predicts from
  the dropped neurons (drop_indices replays the method's first draws)."""
  ref = load.open_source("").layer(layer_id)
  dense = methods.DenseFfn(*(ref[("mlp", m)] for m in ("w_gate", "w_up", "w_down")))
  router = np.random.default_rng(0).normal(0, 0.02, (dense.w_gate_DxF.shape[0], 8))
  for method in ("copy", "drop"):
    spec = methods.UpcycleSpec(method, num_experts=8, top_k=2, drop_ratio=0.5)
    experts = methods.METHODS[method](dense, spec, np.random.default_rng(3))
    layer = {**{p: w for p, w in ref.items() if p[0] != "mlp"}, ("mlp", "router"): router}
    for m, w in zip(("w_gate", "w_up", "w_down"), experts[:3]):
      layer[("mlp", m)] = np.asarray(w)
    out = static.analyse_layer(layer, ref)
    for i, m in enumerate(("w_gate", "w_up", "w_down")):
      got = np.asarray(out["to_base"]["cosine"][f"mlp.{m}"])
      if method == "copy":
        np.testing.assert_allclose(out["weight_cosine"][m], np.ones((9, 9)), atol=1e-6)
        np.testing.assert_allclose(got, 1.0, atol=1e-6)
        continue
      idx = methods.drop_indices(dense[i].shape[0 if m == "w_down" else 1], spec,
                                 np.random.default_rng(3))
      want, sd = np.array([_predicted_drop_cosine(dense[i], idx[e, i],
                                                  0 if m == "w_down" else 1) for e in range(8)]).T
      assert np.all(np.abs(got - want) < 5 * sd + 1e-4), (m, got, want, sd)
      assert np.all(got < 0.9)  # half the neurons redrawn: far from the base
    assert out["to_base"]["cosine"]["attn.wq"] == pytest.approx(1.0)
