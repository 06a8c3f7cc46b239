"""Mixture of Attention (BAM, Zhang et al. 2024): N attention experts mixed per token.

    g(x) = softmax(x W_r)             soft routing over all N experts (top_k = 0, BAM)
    y    = sum_j g_j(x) MHA_j(x)

With `top_k` = k > 0 the weights are a softmax over the k largest router logits and zero
elsewhere (the paper's top-1/top-2 ablation). Every expert is still computed and the
unchosen ones are weighted by zero: exact, but with the soft variant's compute.

Expert KV: each expert has its own q, k, v and o ([N, ...] params). Shared KV: k and v are
shared by all experts (one [D, G, K] projection, one KV cache), q and o stay per expert.
All N experts run as one batched einsum over the expert axis `n`.

There is no balance loss on this router (BAM uses none); its load and entropy are
reported like the FFN router's.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moe_jax.models import layers
from moe_jax.moe.config import layer_ids, parse_layers


@dataclasses.dataclass(frozen=True)
class MoaConfig:
  num_experts: int                # N attention experts
  top_k: int = 0                  # 0 = soft (every expert); k = the k highest-scoring
  shared_kv: bool = False         # one k/v projection for all experts
  layers: str = "all"             # "all", "every:N" or "0,3,5"

  def __post_init__(self):
    n, k = self.num_experts, self.top_k
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"moa.num_experts={n!r}: expected a positive integer")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
      raise ValueError(f"moa.top_k={k!r}: expected 0 (soft) or 1 <= top_k <= num_experts={n}")
    parse_layers(self.layers, "moa.layers")

  def moa_layer_ids(self, n_layers: int) -> tuple[int, ...]:
    return layer_ids(self.layers, n_layers, "moa.layers")


def router_probs(x_BxLxD: jax.Array, router_DxN: jax.Array) -> jax.Array:
  """Softmax of the router logits in float32 (float64 under x64), [B, L, N]."""
  acc = jnp.promote_types(x_BxLxD.dtype, jnp.float32)
  logits = x_BxLxD.astype(acc) @ router_DxN.astype(acc)
  return jax.nn.softmax(logits, axis=-1)


def gates(probs_BxLxN: jax.Array, top_k: int) -> jax.Array:
  """The combine weights [B, L, N]: the probabilities themselves (soft), or renormalised
  over the top_k largest and zero elsewhere. They sum to 1 over the experts."""
  if top_k == 0:
    return probs_BxLxN
  top, idx = jax.lax.top_k(probs_BxLxN, top_k)
  chosen = jax.nn.one_hot(idx, probs_BxLxN.shape[-1], dtype=probs_BxLxN.dtype)  # [B,L,k,N]
  return jnp.einsum("blk,blkn->bln", top / top.sum(-1, keepdims=True), chosen)


def _rope(x_BxLxNxHxK: jax.Array, positions_BxL, inv_freq) -> jax.Array:
  b, length, n, h, k = x_BxLxNxHxK.shape
  x = layers.apply_rope(x_BxLxNxHxK.reshape(b, length, n * h, k), positions_BxL, inv_freq)
  return x.reshape(b, length, n, h, k)


def project(x_BxLxD: jax.Array, wq_NxDxHxK: jax.Array, wk: jax.Array, wv: jax.Array,
            positions_BxL: jax.Array, inv_freq: jax.Array):
  """Every expert's rotated queries [B, L, N, H, K], and the keys and values: [B, L, N, G, K]
  (expert KV) or [B, L, G, K] (shared KV: one set for all experts, one KV cache)."""
  q = _rope(jnp.einsum("bld,ndhk->blnhk", x_BxLxD, wq_NxDxHxK), positions_BxL, inv_freq)
  if wk.ndim == 3:
    k = layers.apply_rope(jnp.einsum("bld,dgk->blgk", x_BxLxD, wk), positions_BxL, inv_freq)
    return q, k, jnp.einsum("bld,dgk->blgk", x_BxLxD, wv)
  k = _rope(jnp.einsum("bld,ndgk->blngk", x_BxLxD, wk), positions_BxL, inv_freq)
  return q, k, jnp.einsum("bld,ndgk->blngk", x_BxLxD, wv)


def attend(q_BxLxNxHxK: jax.Array, k: jax.Array, v: jax.Array, gates_BxLxN: jax.Array,
           wo_NxHxKxD: jax.Array, mask_Bx1xLxS: jax.Array) -> jax.Array:
  """sum_n gates_n * (attention of expert n) W_o,n, [B, L, D], over S keys (S = L, or a
  KV cache's slots); softmax in float32 (at least), like layers.gqa_attention."""
  b, length, n, h, kd = q_BxLxNxHxK.shape
  g = k.shape[-2]
  q = q_BxLxNxHxK.reshape(b, length, n, g, h // g, kd)
  kv = "bmgk" if k.ndim == 4 else "bmngk"
  acc = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 under x64
  scores = jnp.einsum(f"blngrk,{kv}->bngrlm", q, k, preferred_element_type=acc) / math.sqrt(kd)
  scores = jnp.where(mask_Bx1xLxS[:, :, None, None], scores, jnp.finfo(acc).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bngrlm,{kv}->blngrk", probs, v).reshape(b, length, n, h, kd)
  return jnp.einsum("blnhk,bln,nhkd->bld", out, gates_BxLxN.astype(out.dtype), wo_NxHxKxD)


def mixture_of_attention(x_BxLxD: jax.Array, gates_BxLxN: jax.Array, wq_NxDxHxK: jax.Array,
                         wk: jax.Array, wv: jax.Array, wo_NxHxKxD: jax.Array,
                         positions_BxL: jax.Array, mask_Bx1xLxL: jax.Array,
                         inv_freq: jax.Array) -> jax.Array:
  """sum_n gates_n * MHA_n(x), [B, L, D]. `wk`, `wv` are [N, D, G, K] (expert KV) or
  [D, G, K] (shared KV)."""
  q, k, v = project(x_BxLxD, wq_NxDxHxK, wk, wv, positions_BxL, inv_freq)
  return attend(q, k, v, gates_BxLxN, wo_NxHxKxD, mask_Bx1xLxL)


def router_stats(probs_BxLxN: jax.Array, gates_BxLxN: jax.Array) -> dict[str, jax.Array]:
  """load_E: each expert's mean combine weight (sums to 1); router_entropy: the mean
  entropy of the router's distribution, in nats. float32."""
  n = probs_BxLxN.shape[-1]
  load = gates_BxLxN.reshape(-1, n).mean(0).astype(jnp.float32)
  p = probs_BxLxN.astype(jnp.float32)
  entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), -1).mean()
  return {"load_E": load, "router_entropy": entropy}
