"""Mixture of Attention (BAM) and parallel blocks, against plain-numpy references: N
identical experts are the dense attention, shared KV with identical q and o too, soft
and top-k mixtures equal their reference, gradients equal finite differences, a sharded
MoA equals one device, and a parallel block equals x + Attn(norm x) + FFN(norm x)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import batches

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.models import layers, llama
from moe_jax.moe import attention as moa
from moe_jax.moe.attention import MoaConfig
from moe_jax.moe.config import MoeConfig
from moe_jax.train import step

D, H, G, K, L, B = 16, 4, 2, 4, 7, 2  # the mixtures' shapes
THETA = 10000.0


def _rope_np(x_LxHxK, pos_L):
  k = x_LxHxK.shape[-1]
  inv = 1.0 / THETA ** (np.arange(0, k, 2) / k)
  ang = pos_L[:, None] * inv
  ang = np.concatenate([ang, ang], -1)[:, None, :]
  x1, x2 = x_LxHxK[..., :k // 2], x_LxHxK[..., k // 2:]
  return x_LxHxK * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def _mha_np(x_LxD, wq, wk, wv, wo):
  """One sequence, causal, GQA, float64: head j reads KV group j // (H / G)."""
  (_, h, kd), g = wq.shape, wk.shape[1]
  pos = np.arange(len(x_LxD), dtype=np.float64)
  q = _rope_np(np.einsum("ld,dhk->lhk", x_LxD, wq), pos)
  k = _rope_np(np.einsum("ld,dgk->lgk", x_LxD, wk), pos)
  v = np.einsum("ld,dgk->lgk", x_LxD, wv)
  out = np.zeros_like(q)
  for j in range(h):
    s = q[:, j] @ k[:, j // (h // g)].T / np.sqrt(kd)
    s = np.where(np.tril(np.ones((len(s), len(s)), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, j] = (p / p.sum(-1, keepdims=True)) @ v[:, j // (h // g)]
  return np.einsum("lhk,hkd->ld", out, wo)


def _moa_np(x_BxLxD, router, wq, wk, wv, wo, top_k):
  """sum_n g_n MHA_n(x) with g the softmax (top_k 0) or the top-k renormalised softmax."""
  logits = x_BxLxD @ router
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  if top_k:
    keep = np.argsort(-p, -1)[..., :top_k]
    g = np.zeros_like(p)
    np.put_along_axis(g, keep, np.take_along_axis(p, keep, -1), -1)
    p = g / g.sum(-1, keepdims=True)
  n = wq.shape[0]
  kv = lambda w, e: w if w.ndim == 3 else w[e]
  return np.stack([sum(p[b, :, e, None] * _mha_np(x_BxLxD[b], wq[e], kv(wk, e), kv(wv, e), wo[e])
                       for e in range(n)) for b in range(len(x_BxLxD))])


def _weights(n, shared_kv=False, seed=0):
  r = np.random.default_rng(seed)
  kv = (D, G, K) if shared_kv else (n, D, G, K)
  return (r.normal(0, 1, (D, n)), r.normal(0, 0.3, (n, D, H, K)), r.normal(0, 0.3, kv),
          r.normal(0, 0.3, kv), r.normal(0, 0.3, (n, H, K, D)))


def _ours(x, router, wq, wk, wv, wo, top_k):
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x = f32(x)
  positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  mask = layers.attention_mask(jnp.ones(x.shape[:2], jnp.int32), None)
  gates = moa.gates(moa.router_probs(x, f32(router)), top_k)
  return np.asarray(moa.mixture_of_attention(
      x, gates, f32(wq), f32(wk), f32(wv), f32(wo), positions, mask,
      layers.rope_inv_freq(K, THETA, None)), np.float64)


X = np.random.default_rng(9).normal(0, 1, (B, L, D))


def _dense_ours(x, wq, wk, wv, wo):
  """The dense attention as the model computes it (float32): layers.gqa_attention."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x = f32(x)
  positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  mask = layers.attention_mask(jnp.ones(x.shape[:2], jnp.int32), None)
  inv = layers.rope_inv_freq(K, THETA, None)
  q = layers.apply_rope(jnp.einsum("bld,dhk->blhk", x, f32(wq)), positions, inv)
  k = layers.apply_rope(jnp.einsum("bld,dgk->blgk", x, f32(wk)), positions, inv)
  v = jnp.einsum("bld,dgk->blgk", x, f32(wv))
  out = layers.gqa_attention(q, k, v, mask)
  return np.asarray(jnp.einsum("blhk,hkd->bld", out, f32(wo)), np.float64)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_identical_experts_are_the_dense_attention(shared_kv):
  """N copies of one attention (shared KV: identical q and o) under any router equal it:
  to float32 rounding against the model's dense path, and against float64 numpy."""
  _, wq, wk, wv, wo = _weights(1, shared_kv)
  kv = lambda w: w if shared_kv else w[0]
  ours = _dense_ours(X, wq[0], kv(wk), kv(wv), wo[0])
  reference = np.stack([_mha_np(x, wq[0], kv(wk), kv(wv), wo[0]) for x in X])
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
  n = 4
  rep = lambda w: np.repeat(w, n, 0)
  router = np.random.default_rng(1).normal(0, 1, (D, n))
  for top_k in (0, 2):
    got = _ours(X, router, rep(wq), wk if shared_kv else rep(wk), wv if shared_kv else rep(wv),
                rep(wo), top_k)
    np.testing.assert_allclose(got, ours, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_mixture_matches_reference(shared_kv, top_k):
  w = _weights(3, shared_kv, seed=top_k)
  np.testing.assert_allclose(_ours(X, *w, top_k), _moa_np(X, *w, top_k), rtol=0, atol=2e-5)


def test_gates_sum_to_one_and_keep_top_k():
  p = moa.router_probs(jnp.asarray(X, jnp.float32), jnp.asarray(_weights(5)[0], jnp.float32))
  for k in (0, 1, 3):
    g = np.asarray(moa.gates(p, k))
    np.testing.assert_allclose(g.sum(-1), 1.0, atol=1e-6)
    assert ((g > 0).sum(-1) == (5 if k == 0 else k)).all()


@pytest.mark.parametrize("shared_kv", [False, True])
def test_router_and_expert_gradients_match_finite_differences(shared_kv):
  """In float64, for the router and each of q, k, v, o: the gradient's inner product with a
  random direction equals the central difference of the loss along it."""
  w = _weights(3, shared_kv, seed=3)
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = layers.attention_mask(jnp.ones((B, L), jnp.int32), None)
  inv = layers.rope_inv_freq(K, THETA, None)
  rng = np.random.default_rng(4)
  probe = rng.normal(0, 1, (B, L, D))
  directions = [rng.normal(0, 1, a.shape) for a in w]

  with jax.enable_x64(True):
    def f(router, wq, wk, wv, wo):
      x = jnp.asarray(X)
      g = moa.gates(moa.router_probs(x, router), 0)
      y = moa.mixture_of_attention(x, g, wq, wk, wv, wo, positions, mask, inv)
      return jnp.sum(jnp.asarray(probe) * y)

    args = [jnp.asarray(a, jnp.float64) for a in w]
    grads = jax.jit(jax.grad(f, argnums=tuple(range(5))))(*args)
    f_jit, eps = jax.jit(f), 1e-6
    for i, (g, v) in enumerate(zip(grads, directions)):
      step = [a + eps * v if j == i else a for j, a in enumerate(args)]
      back = [a - eps * v if j == i else a for j, a in enumerate(args)]
      fd = (float(f_jit(*step)) - float(f_jit(*back))) / (2 * eps)
      np.testing.assert_allclose(float(jnp.sum(g * v)), fd, rtol=1e-6, err_msg=f"argument {i}")


def _cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
              ffn_dim=48, moa=MoaConfig(num_experts=4),
              moe=MoeConfig(num_experts=4, top_k=1, expert_dim=48))
  return ModelConfig(**{**base, **kw})


def _loss_and_grads(model, batch):
  graphdef, state = nnx.split(model)

  def f(state, batch):
    return nnx.value_and_grad(lambda m: step.loss_fn(m, batch, train=True)[0])(
        nnx.merge(graphdef, state))

  loss, grads = jax.jit(f)(state, batch)
  return float(loss), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def test_sharded_moa_equals_one_device():
  """Expert KV: q, k, v and o all split over the expert axis (shared KV only drops that
  axis from k and v). Expert-parallel FFNs: test_expert_parallel.py."""
  cfg = _cfg(moa=MoaConfig(num_experts=4), block="parallel", moe=None, n_layers=1)
  mesh = sharding.make_mesh(data=2, expert=4)
  model = llama.create(cfg, seed=0, mesh=mesh)
  wq = model.layers[0].attn.wq[...]
  assert wq.sharding.spec[0] == "expert" and {s.data.shape[0] for s in wq.addressable_shards} == {1}
  batch = batches.lm_batch(8, 12)
  want_loss, want_grads = _loss_and_grads(sharding.place(model, None), batch)
  spec = sharding.logical_to_spec(("batch", "length"), mesh_axes=mesh.axis_names)
  sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, spec)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    loss, grads = _loss_and_grads(model, sharded)
  np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), grads, want_grads)


def _rms_np(x, scale, eps):
  return scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def test_parallel_block_equals_its_reference():
  cfg = _cfg(moa=None, moe=None, block="parallel", n_layers=1)
  model = llama.create(cfg, seed=2)
  block = model.layers[0]
  assert not hasattr(block, "mlp_norm")  # one norm per block
  x = np.random.default_rng(5).normal(0, 1, (B, L, cfg.d_model))
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = layers.attention_mask(jnp.ones((B, L), jnp.int32), None)
  inv = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)
  got, stats, attn_stats, kv = block(jnp.asarray(x, jnp.float32), positions, mask, inv)
  assert stats == {} and attn_stats == {} and kv is None
  p = lambda w: np.asarray(w[...], np.float64)
  h = _rms_np(x, p(block.attn_norm), cfg.rms_eps)
  attn = np.stack([_mha_np(hb, p(block.attn.wq), p(block.attn.wk), p(block.attn.wv),
                           p(block.attn.wo)) for hb in h])
  silu = lambda z: z / (1 + np.exp(-z))
  ffn = (silu(h @ p(block.mlp.w_gate)) * (h @ p(block.mlp.w_up))) @ p(block.mlp.w_down)
  np.testing.assert_allclose(np.asarray(got), x + attn + ffn, rtol=0, atol=1e-5)


def test_bad_configs_name_the_key():
  for kw, msg in ((dict(num_experts=0), "moa.num_experts=0"),
                  (dict(num_experts=2, top_k=3), "moa.top_k=3"),
                  (dict(num_experts=2, layers="x"), "moa.layers='x'")):
    with pytest.raises(ValueError, match=msg):
      MoaConfig(**kw)
  with pytest.raises(ValueError, match="model.block='gptj'"):
    _cfg(block="gptj")
  with pytest.raises(ValueError, match="model.moa: .*qkv_bias=False"):
    _cfg(qkv_bias=True)
  cfg = _cfg(moa=MoaConfig(num_experts=2, top_k=1, shared_kv=True, layers="1"))
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.moa_layer_ids == (1,)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_active_params_count_every_attention_expert(shared_kv):
  """A soft MoA runs all of its experts: the active-parameter count (for MFU and the
  study's FLOPs axis) grows by exactly the attention experts' and router's params."""
  from moe_jax.train import flops  # pylint: disable=g-import-not-at-top
  moa_cfg = _cfg(moa=MoaConfig(num_experts=3, shared_kv=shared_kv, layers="1"))
  dense_cfg = _cfg(moa=None)
  size = lambda cfg, part: sum(int(np.prod(v.get_value().shape)) for p, v in
                               nnx.to_flat_state(nnx.state(llama.abstract(cfg), nnx.Param))
                               if p[:3] == ("layers", 1, part))
  extra = size(moa_cfg, "attn") - size(dense_cfg, "attn")
  assert extra > 0
  assert flops.active_params_per_token(moa_cfg) - flops.active_params_per_token(dense_cfg) == extra
