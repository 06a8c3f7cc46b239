"""Upcycling: function preservation where the math allows, drop counts, merge, errors."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from moe_jax.convert import assemble, hf, load
from moe_jax.upcycle import convert, methods, router_init

E = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random llama (F=96) saved as safetensors, and its dense logits."""
  path = str(tmp_path_factory.mktemp("dense") / "llama")
  hf_models.make_model("llama").save_pretrained(path)
  cfg = hf.read_hf_config(path)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24)))
  dense = assemble.model_from_tensors(cfg, hf.iter_safetensors(path))
  return path, cfg, tokens, np.asarray(dense(tokens)[0])


def upcycled_logits(path, cfg, tokens, router_kind="normal", std=0.5, layers="all", **spec):
  spec = methods.UpcycleSpec(**spec)
  moe_cfg = convert.moe_model_config(cfg, spec, layers)
  up = convert.Upcycler(spec, moe_cfg, router_kind, std)
  items = convert.upcycle_items(cfg, hf.iter_safetensors(path), up) if isinstance(path, str) \
      else convert.upcycle_items(cfg, path, up)
  model = convert.model_from_items(moe_cfg, items)
  return np.asarray(model(tokens)[0])


def test_copy_preserves_function(tiny):
  path, cfg, tokens, dense = tiny
  out = upcycled_logits(path, cfg, tokens, method="copy", num_experts=E, top_k=2)
  assert np.abs(out - dense).max() <= 1e-5


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_virtual_group_preserves_function(tiny, g):
  path, cfg, tokens, dense = tiny
  for top_k in sorted({g, min(2 * g, E)}):
    out = upcycled_logits(path, cfg, tokens, method="virtual_group", num_experts=E, top_k=top_k,
                          granularity=g, router="topk_softmax")
    assert np.abs(out - dense).max() <= 1e-5, ("topk_softmax", g, top_k)
    out = upcycled_logits(path, cfg, tokens, "zeros", method="virtual_group", num_experts=E,
                          top_k=top_k, granularity=g, router="softmax_topk")
    assert np.abs(out - dense).max() <= 1e-5, ("softmax_topk", g, top_k)


def test_softmax_topk_error_shrinks_with_router_std(tiny):
  path, cfg, tokens, dense = tiny
  errors = {}
  for std in (1.0, 0.1, 0.01, 0.001):
    out = upcycled_logits(path, cfg, tokens, "normal", std, method="virtual_group",
                          num_experts=E, top_k=4, granularity=2, router="softmax_topk")
    errors[std] = float(np.abs(out - dense).max())
  print("softmax_topk max |logit diff| by router std:", errors)
  values = [errors[s] for s in (1.0, 0.1, 0.01, 0.001)]
  assert all(a > b for a, b in zip(values, values[1:])) and values[-1] < values[0] / 100


@pytest.mark.parametrize("mode", ["random", "kmeans"])
def test_partition_with_all_experts_is_dense(tiny, mode):
  path, cfg, tokens, dense = tiny
  out = upcycled_logits(path, cfg, tokens, "zeros", method="partition", num_experts=4, top_k=4,
                        partition=mode)
  assert np.abs(out - dense).max() <= 1e-5


def test_partition_sets_are_disjoint_and_balanced():
  rng = np.random.default_rng(0)
  dense = methods.DenseFfn(*(rng.normal(size=s).astype(np.float32)
                             for s in ((16, 64), (16, 64), (64, 16))))
  for mode in ("random", "kmeans"):
    spec = methods.UpcycleSpec("partition", num_experts=4, top_k=1, partition=mode)
    sets = methods.partition_sets(dense, spec, np.random.default_rng(1))
    assert sorted(np.concatenate(sets).tolist()) == list(range(64))
    assert [len(s) for s in sets] == [16] * 4


@pytest.mark.parametrize("shared", [False, True])
def test_drop_reinitialises_exactly_the_claimed_fraction(shared):
  rng = np.random.default_rng(0)
  d, f, r = 64, 200, 0.3
  dense = methods.DenseFfn(rng.normal(0.1, 0.5, (d, f)).astype(np.float32),
                           rng.normal(-0.2, 0.3, (d, f)).astype(np.float32),
                           rng.normal(0.0, 0.7, (f, d)).astype(np.float32))
  spec = methods.UpcycleSpec("drop", num_experts=4, top_k=2, drop_ratio=r, drop_shared_indices=shared)
  out = methods.drop(dense, spec, np.random.default_rng(5))
  idx = methods.drop_indices(f, spec, np.random.default_rng(5))
  n = round(r * f)
  for e in range(4):
    changed = [np.flatnonzero((out.w_gate_ExDxF[e] != dense.w_gate_DxF).any(0)),
               np.flatnonzero((out.w_up_ExDxF[e] != dense.w_up_DxF).any(0)),
               np.flatnonzero((out.w_down_ExFxD[e] != dense.w_down_FxD).any(1))]
    for m in range(3):
      assert len(changed[m]) == n and np.array_equal(changed[m], idx[e, m])
    if shared:
      assert np.array_equal(changed[0], changed[1]) and np.array_equal(changed[0], changed[2])
  new = out.w_gate_ExDxF[:, :, idx[0, 0]][0]
  assert abs(new.mean() - dense.w_gate_DxF.mean()) < 0.03
  assert abs(new.std() / dense.w_gate_DxF.std() - 1) < 0.05


def test_merge_takes_expert_i_from_model_i():
  rng = np.random.default_rng(0)
  denses = [methods.DenseFfn(*(rng.normal(size=s) for s in ((4, 6), (4, 6), (6, 4))))
            for _ in range(3)]
  out = methods.merge(denses, methods.UpcycleSpec("merge", 3, 1), rng)
  for i in range(3):
    np.testing.assert_array_equal(out.w_down_ExFxD[i], denses[i].w_down_FxD)
  bad = denses[:2] + [methods.DenseFfn(np.zeros((4, 8)), np.zeros((4, 8)), np.zeros((8, 4)))]
  with pytest.raises(ValueError, match="merge source 2"):
    methods.merge(bad, methods.UpcycleSpec("merge", 3, 1), rng)


def test_router_init_repeat_and_conditioning():
  rng = np.random.default_rng(0)
  r = router_init.init_router("normal", 16, 8, rng, repeat=2)
  assert np.array_equal(r[:, 0], r[:, 1]) and not np.array_equal(r[:, 0], r[:, 2])
  hidden = rng.normal(size=(200, 16))
  r = router_init.init_router("kmeans", 16, 8, rng, repeat=2, hidden_NxD=hidden)
  assert len({tuple(c) for c in r.T.round(6)}) == 4
  with pytest.warns(UserWarning, match="ill-conditioned"):
    router_init.check_conditioning(np.repeat(rng.normal(size=(16, 1)), 4, axis=1))


@pytest.mark.parametrize("spec,msg", [
    (dict(method="virtual_group", num_experts=8, top_k=2, granularity=5), "granularity=5 does not divide ffn_dim=96"),
    (dict(method="virtual_group", num_experts=6, top_k=2, granularity=4), "does not divide|not a multiple"),
    (dict(method="virtual_group", num_experts=8, top_k=2, granularity=4), "topk=2 is not a multiple of granularity=4"),
    (dict(method="copy", num_experts=8, top_k=9), "topk=9"),
    (dict(method="magic", num_experts=8, top_k=2), "upcycle.method='magic'"),
])
def test_bad_specs(spec, msg):
  with pytest.raises(ValueError, match=msg):
    methods.UpcycleSpec(**spec).validate(96)


def test_smollm2_upcycle_preserves_function():
  """Three of SmolLM2's 30 layers upcycled (the math is per layer), 30-layer tolerance."""
  cfg = load.read_config("")
  dense, _ = load.load_model("")
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 32)))
  base = np.asarray(dense(tokens)[0])
  tensors = list(convert.dense_tensors(dense))
  del dense
  for kw in (dict(method="copy", num_experts=8, top_k=2),
             dict(method="virtual_group", num_experts=8, top_k=4, granularity=4)):
    out = upcycled_logits(tensors, cfg, tokens, layers="0,15,29", **kw)
    assert np.abs(out - base).max() <= 1e-4, kw


def _run(args, cwd):
  return subprocess.run([sys.executable, "-m", "experiments.upcycle", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_binary_refuses_before_writing(tiny, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = tiny[0]
  out = tmp_path / "moe"
  r = _run(["--config=configs/upcycle.py:method=virtual_group,granularity=5", f"--workdir={out}",
            f"--config.source={path}"], root)
  assert r.returncode != 0 and "granularity=5 does not divide ffn_dim=96" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
  out.mkdir()
  (out / "x").write_text("keep")
  r = _run(["--config=configs/upcycle.py", f"--workdir={out}", f"--config.source={path}"], root)
  assert r.returncode != 0 and "exists and is not empty" in r.stderr
  assert os.listdir(out) == ["x"]
