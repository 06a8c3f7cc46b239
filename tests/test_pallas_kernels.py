"""Pallas kernels in interpret mode vs plain-jnp references (forward and gradients), the
`pallas` backend vs `dropless` (layer and training step), and lowering for GPU and TPU."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import example, given, settings, strategies as st

import subproc
from moe_jax.config import ModelConfig
from moe_jax.models import llama
from moe_jax.moe import dispatch, kernel_check, layer, routers
from moe_jax.moe.config import MoeConfig
from moe_jax.train import optim, step
from pallas_kernels import target as target_lib
from pallas_kernels.gmm import ops as gmm_ops
from pallas_kernels.permute import ops as permute_ops
from pallas_kernels.router import ops as router_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = settings(max_examples=3, deadline=None)
MOSAIC = target_lib.Target("mosaic", True)  # the TPU kernels, interpreted
TARGETS = st.sampled_from([target_lib.INTERPRET, MOSAIC])
# bfloat16: kernel outputs and cotangents are rounded to bf16 (eps 2^-8 = 3.9e-3) while the
# references accumulate in float32; over 40 random gmm cases the weight gradient needed
# 9.4e-3 (input gradient 4.5e-3, output 1.5e-3), so 2e-2 is about 5 bf16 ulps.
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _close(got, want, dtype=jnp.float32, scale=1.0):
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol["atol"] * scale, rtol=tol["rtol"])


def _experts(rng, t, k, e, mode):
  """[T, K] distinct expert ids per token: random, every token on expert 0 first (one
  expert takes all tokens when k = 1), or only the first half of the experts (empty ones)."""
  pool = {"random": e, "one": e, "half": max(k, e // 2)}[mode]
  ids = np.stack([rng.permutation(pool)[:k] for _ in range(t)]).astype(np.int32)
  if mode == "one":
    ids = np.stack([np.concatenate([[0], rng.permutation(np.arange(1, e))[:k - 1]])
                    for _ in range(t)]).astype(np.int32)
  return jnp.asarray(ids)


# ------------------------------------------------------------------------------ router

@SETTINGS
@given(st.integers(1, 37), st.integers(1, 8), st.integers(1, 4),
       st.sampled_from([("topk_softmax", False, 1.0), ("softmax_topk", False, 2.0),
                        ("softmax_topk", True, 1.5), ("sigmoid_bias", False, 2.5)]),
       st.booleans(), TARGETS, st.integers(0, 10_000))
@example(13, 5, 1, ("softmax_topk", True, 1.0), True, MOSAIC, 0)  # one expert takes all
def test_fused_router_matches_routers(t, e, k, router, skew, target, seed):
  name, norm, scale = router
  k = min(k, e)
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=4, router=name, norm_topk_prob=norm,
                  topk_scaling_factor=scale)
  logits = jax.random.normal(jax.random.key(seed), (t, e)) * 2
  if skew:  # expert 0 first for every token
    logits = logits.at[:, 0].add(20.0)
  bias = jnp.linspace(-0.5, 0.5, e) if name == "sigmoid_bias" else None
  mix_k, mix_e = jnp.arange(1.0, k + 1), jnp.arange(1.0, e + 1)
  loss = lambda r: jnp.sum(jnp.sin(r.weights_TxK) * mix_k) + jnp.sum(jnp.cos(r.probs_TxE) * mix_e)
  fused_route = lambda l: router_ops.route(l, cfg, bias, target=target, block_t=8)
  fused, grad = jax.jit(lambda l: (fused_route(l), jax.grad(lambda l: loss(fused_route(l)))(l)))(
      logits)
  ref_route = lambda l: routers.route(l, cfg, bias_E=bias)
  ref, ref_grad = jax.jit(lambda l: (ref_route(l), jax.grad(lambda l: loss(ref_route(l)))(l)))(
      logits)
  np.testing.assert_array_equal(np.asarray(fused.experts_TxK), np.asarray(ref.experts_TxK))
  _close(fused.weights_TxK, ref.weights_TxK)
  _close(fused.probs_TxE, ref.probs_TxE)
  counts = np.bincount(np.asarray(ref.experts_TxK).ravel(), minlength=e)
  np.testing.assert_array_equal(np.asarray(fused.counts_E), counts)
  _close(grad, ref_grad)


# ---------------------------------------------------------------------- permute / unpermute

@SETTINGS
@given(st.integers(1, 21), st.integers(1, 3), st.integers(1, 6), st.integers(1, 40),
       st.sampled_from(["random", "one", "half"]), st.sampled_from([jnp.float32, jnp.bfloat16]),
       TARGETS, st.integers(0, 10_000))
@example(11, 1, 4, 20, "one", jnp.float32, MOSAIC, 0)  # one expert takes all, 3 empty
def test_permute_unpermute_match_reference(t, k, e, d, mode, dtype, target, seed):
  k = min(k, e)
  rng = np.random.default_rng(seed)
  experts = _experts(rng, t, k, e, mode)
  p = permute_ops.plan(experts, e)
  order = np.argsort(np.asarray(experts).ravel(), kind="stable")
  row = np.argsort(order).reshape(t, k)
  counts = np.bincount(np.asarray(experts).ravel(), minlength=e)
  np.testing.assert_array_equal(np.asarray(p.order_M), order)
  np.testing.assert_array_equal(np.asarray(p.row_TxK), row)
  np.testing.assert_array_equal(np.asarray(p.group_sizes_E), counts)
  np.testing.assert_array_equal(np.asarray(p.group_offsets_E), np.cumsum(counts) - counts)

  x = jnp.asarray(rng.normal(size=(t, d)), dtype)
  ys = jnp.asarray(rng.normal(size=(t * k, d)), dtype)
  w = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
  ref_permute = lambda x: x[order // k]
  ref_unpermute = lambda ys, w: jnp.einsum(
      "tkd,tk->td", ys[row].astype(jnp.float32), w).astype(ys.dtype)
  sq = lambda a: jnp.sum(jnp.sin(a.astype(jnp.float32)))

  @jax.jit
  def run(x, ys, w):  # forward and gradients in one compilation
    xs = permute_ops.permute(x, p, target)
    gx = jax.grad(lambda x: sq(permute_ops.permute(x, p, target)))(x)
    out = permute_ops.unpermute(ys, w, p, target)
    g = jax.grad(lambda ys, w: sq(permute_ops.unpermute(ys, w, p, target)), argnums=(0, 1))(ys, w)
    return xs, gx, out, g

  @jax.jit
  def run_ref(x, ys, w):
    return (ref_permute(x), jax.grad(lambda x: sq(ref_permute(x)))(x), ref_unpermute(ys, w),
            jax.grad(lambda ys, w: sq(ref_unpermute(ys, w)), argnums=(0, 1))(ys, w))

  xs, gx, out, g = run(x, ys, w)
  xs_ref, gx_ref, out_ref, g_ref = run_ref(x, ys, w)
  np.testing.assert_array_equal(np.asarray(xs, np.float32), np.asarray(xs_ref, np.float32))
  _close(out, out_ref, dtype, scale=k)
  _close(gx, gx_ref, dtype, scale=k)
  _close(g[0], g_ref[0], dtype)
  _close(g[1], g_ref[1], dtype, scale=d)


# ------------------------------------------------------------------------- grouped matmul

def _group_sizes(rng, m, e, mode):
  if mode == "one":
    sizes = np.zeros(e, np.int32)
    sizes[rng.integers(e)] = m
    return sizes
  pool = e if mode == "random" else max(1, e // 2)
  return np.bincount(rng.integers(0, pool, m), minlength=e).astype(np.int32)


def _gmm_ref(lhs, rhs, sizes):
  ids = np.repeat(np.arange(len(sizes)), sizes)
  return jnp.einsum("mk,mkn->mn", lhs.astype(jnp.float32), rhs[ids].astype(jnp.float32),
                    precision="highest")


@SETTINGS
@given(st.integers(1, 45), st.integers(1, 5), st.integers(1, 24), st.integers(1, 24),
       st.sampled_from(["random", "one", "half"]), st.sampled_from([jnp.float32, jnp.bfloat16]),
       TARGETS, st.integers(0, 10_000))
@example(37, 4, 20, 12, "one", jnp.float32, target_lib.INTERPRET, 0)
@example(45, 5, 9, 17, "half", jnp.float32, MOSAIC, 1)
def test_gmm_matches_reference(m, e, k, n, mode, dtype, target, seed):
  rng = np.random.default_rng(seed)
  sizes = _group_sizes(rng, m, e, mode)
  lhs = jnp.asarray(rng.normal(size=(m, k)) * 0.5, dtype)
  rhs = jnp.asarray(rng.normal(size=(e, k, n)) * 0.5, dtype)
  gs = jnp.asarray(sizes)
  tiling = (8, 8, 8)  # row tiles spanning group boundaries, ragged last tiles
  loss = lambda o: jnp.sum(jnp.sin(o.astype(jnp.float32)))
  fused = lambda l, r: gmm_ops.gmm(l, r, gs, target, tiling)
  out, g = jax.jit(lambda l, r: (fused(l, r), jax.grad(lambda l, r: loss(fused(l, r)),
                                                       argnums=(0, 1))(l, r)))(lhs, rhs)
  assert out.dtype == dtype
  out_ref, g_ref = jax.jit(lambda l, r: (_gmm_ref(l, r, sizes), jax.grad(
      lambda l, r: loss(_gmm_ref(l, r, sizes)), argnums=(0, 1))(l, r)))(lhs, rhs)
  _close(out, out_ref, dtype, scale=np.sqrt(k))
  _close(g[0], g_ref[0], dtype, scale=np.sqrt(n))
  _close(g[1], g_ref[1], dtype, scale=np.sqrt(m))
  if sizes.min() == 0:  # an empty expert gets an exactly zero weight gradient
    assert not np.asarray(g[1], np.float32)[sizes == 0].any()


# ------------------------------------------------------------------- backend and training

def _layer_params(e, d, f, seed=0, scale=0.3):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (d, e)) * scale,
          jax.random.normal(ks[1], (e, d, f)) * scale,
          jax.random.normal(ks[2], (e, d, f)) * scale,
          jax.random.normal(ks[3], (e, f, d)) * scale)


@pytest.mark.parametrize("router", ["sigmoid_bias", "topk_softmax"])
def test_pallas_backend_equals_dropless(router):
  """Through layer.moe_forward: the fused router kernel, permute, gmm and unpermute."""
  e, k, t, d, f = 6, 2, 21, 8, 6  # 42 assignments: not a multiple of any tile size
  params = _layer_params(e, d, f, seed=3)
  x = jax.random.normal(jax.random.key(7), (t, d))

  def loss_and_grads(backend, x, *params):
    cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=f, backend=backend,
                    router=router, topk_scaling_factor=2.0 if router == "sigmoid_bias" else 1.0)
    loss = lambda x, *p: jnp.sum(jnp.sin(layer.moe_forward(x, *p, cfg)[0]))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, *params)

  (ref_loss, ref_grads), (loss, grads) = jax.jit(lambda *a: (
      loss_and_grads("dropless", *a), loss_and_grads("pallas", *a)))(x, *params)
  _close(loss, ref_loss)
  for a, b in zip(grads, ref_grads):
    _close(a, b)


def _train_losses(backend: str, steps: int = 3) -> list[float]:
  moe = MoeConfig(num_experts=4, top_k=2, expert_dim=8, backend=backend, router="softmax_topk",
                  norm_topk_prob=True)
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=8, ffn_dim=32, max_seq_len=16, moe=moe)
  model = llama.create(cfg, 0)
  tx = optim.make_tx(optim.OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.tile(np.arange(11, dtype=np.int32), (2, 1)),
           "segment_ids": np.ones((2, 11), np.int32), "loss_mask": np.ones((2, 11), np.float32)}
  batch = jax.tree.map(jnp.asarray, batch)
  return [float(step.train_step(model, optimizer, batch, jax.random.key(i), 1e-2)["loss"])
          for i in range(steps)]


def test_training_step_pallas_equals_dropless():
  pallas, dropless = _train_losses("pallas"), _train_losses("dropless")
  assert pallas[0] != pallas[-1]  # the steps did update the model
  np.testing.assert_allclose(pallas, dropless, atol=1e-5, rtol=0)


def test_auto_backend_and_targets_on_cpu():
  assert jax.default_backend() == "cpu"
  assert dispatch.resolve_backend("auto") == "dropless"
  assert dispatch.resolve_backend("pallas") == "pallas"
  assert MoeConfig(num_experts=2, top_k=1, expert_dim=4, backend="auto").backend == "auto"
  assert MoeConfig(num_experts=2, top_k=1, expert_dim=4).backend == "dropless"
  assert target_lib.default() == target_lib.INTERPRET
  assert target_lib.for_platform("gpu") == target_lib.Target("triton", False)
  assert target_lib.for_platform("tpu") == target_lib.Target("mosaic", False)
  cfg = MoeConfig(num_experts=4, top_k=2, expert_dim=6, backend="auto")
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  routing = routers.Routing(f32(5, 2), jax.ShapeDtypeStruct((5, 2), jnp.int32), f32(5, 4))
  args = (f32(5, 8), routing, f32(4, 8, 6), f32(4, 8, 6), f32(4, 6, 8), cfg)
  jaxpr = {b: str(jax.make_jaxpr(dispatch.BACKENDS[b], static_argnums=5)(*args))
           for b in ("auto", "dropless")}
  assert jaxpr["auto"] == jaxpr["dropless"]


def test_check_kernels_lowers_for_tpu_and_cuda():
  env = subproc.env()
  proc = subprocess.run([sys.executable, "-m", "experiments.check_kernels",
                         "--platforms=tpu,cuda"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  lines = proc.stdout.strip().splitlines()
  assert proc.returncode == 0, proc.stdout + proc.stderr
  names = {line.split()[0] for line in lines}
  assert {"router_topk_softmax", "permute", "unpermute_grad", "gmm_grad",
          "moe_layer_float32_grad", "moe_layer_bfloat16_grad"} <= names
  for platform in ("tpu", "cuda"):
    assert {line.split()[0] for line in lines if line.split()[1] == platform} == names
  assert all(line.split()[2:] == ["ok"] for line in lines), proc.stdout


def test_triton_tiling_may_name_warps_and_stages():
  rng = np.random.default_rng(0)
  lhs, rhs = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32), jnp.asarray(
      rng.normal(size=(3, 8, 8)), jnp.float32)
  gs = jnp.asarray([7, 0, 13], jnp.int32)
  want = gmm_ops.gmm(lhs, rhs, gs, target_lib.INTERPRET, (8, 8, 8))
  got = gmm_ops.gmm(lhs, rhs, gs, target_lib.INTERPRET, (8, 8, 8, 8, 3))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(gmm_ops.gmm(lhs, rhs, gs, MOSAIC, (8, 8, 8, 8, 3))),
                                np.asarray(gmm_ops.gmm(lhs, rhs, gs, MOSAIC, (8, 8, 8))))
  with pytest.raises(ValueError, match=r"tiling=\(8, 8\)"):
    gmm_ops.gmm(lhs, rhs, gs, target_lib.INTERPRET, (8, 8))


def test_kernel_check_passes_the_kernels_and_catches_a_wrong_one(monkeypatch):
  """check_kernels --run's checks (run on a GPU/TPU for real): within bounds here, and a
  kernel that drops one group's rows is reported far outside them."""
  sizes = kernel_check.Sizes(t=40, d=16, f=8, e=4, k=2)
  errs = kernel_check.run_all(sizes, "float32")
  assert {"gmm", "gmm d/d rhs (tgmm)", "permute d/d x", "router softmax_topk",
          "layer grads"} <= set(errs)
  assert max(errs.values()) < 1e-5, errs
  real = gmm_ops.gmm
  broken = lambda l, r, gs, *a: real(l, r, gs.at[-1].set(0), *a)  # the last group unwritten
  monkeypatch.setattr(gmm_ops, "gmm", broken)
  errs = kernel_check.check_gmm(jax.random.key(1), sizes, jnp.float32)
  assert errs["gmm"] > 0.1, errs
