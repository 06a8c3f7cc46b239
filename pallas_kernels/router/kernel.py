"""Fused router kernel: logits -> probabilities -> top-k -> weights, ids, expert counts.

One program per tile of `block_t` tokens; the expert axis is whole in the tile (padded to a
power of two with -inf logits). Top-k is k rounds of "max, lowest index at the max, mask
it out" (lax.top_k does not lower inside Triton or Mosaic kernels); ties go to the lower
expert id, as with lax.top_k. Router semantics: moe_jax/moe/routers.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.target import Target, compiler_params, next_pow2

ROUTERS = ("topk_softmax", "softmax_topk", "sigmoid_bias")


def _top_k(choose_TxE, k: int, kp: int):
  """(values_TxKp, ids_TxKp, one-hots): k rounds of iterative max; columns >= k hold -inf/0."""
  t, e = choose_TxE.shape
  col = lax.broadcasted_iota(jnp.int32, (t, e), 1)
  kcol = lax.broadcasted_iota(jnp.int32, (t, kp), 1)
  vals = jnp.full((t, kp), -jnp.inf, jnp.float32)
  ids = jnp.zeros((t, kp), jnp.int32)
  hits, x = [], choose_TxE
  for j in range(k):
    m = jnp.max(x, axis=1, keepdims=True)
    i = jnp.min(jnp.where(x == m, col, e), axis=1, keepdims=True)
    hit = col == i
    vals, ids = jnp.where(kcol == j, m, vals), jnp.where(kcol == j, i, ids)
    x = jnp.where(hit, -jnp.inf, x)
    hits.append(hit)
  return vals, ids, hits


def _gather_k(a_TxE, hits, kp: int):
  """Column j = a at the expert chosen in round j (0 for columns >= k)."""
  kcol = lax.broadcasted_iota(jnp.int32, (a_TxE.shape[0], kp), 1)
  out = jnp.zeros((a_TxE.shape[0], kp), jnp.float32)
  for j, hit in enumerate(hits):
    out = jnp.where(kcol == j, jnp.sum(jnp.where(hit, a_TxE, 0.0), axis=1, keepdims=True), out)
  return out


def _kernel(logits_ref, bias_ref, w_ref, ids_ref, probs_ref, counts_ref, *, router, top_k,
            norm_topk_prob, scale, num_tokens):
  logits = logits_ref[...].astype(jnp.float32)
  bt, kp = logits.shape[0], w_ref.shape[1]
  if router == "sigmoid_bias":
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=1, keepdims=True)
    _, ids, hits = _top_k(scores + bias_ref[...], top_k, kp)
    chosen = _gather_k(scores, hits, kp)
    weights = chosen / jnp.sum(chosen, axis=1, keepdims=True) * scale
  else:
    top = jnp.max(logits, axis=1, keepdims=True)
    ex = jnp.exp(logits - top)
    probs = ex / jnp.sum(ex, axis=1, keepdims=True)
    if router == "topk_softmax":
      vals, ids, hits = _top_k(logits, top_k, kp)
      ex_k = jnp.exp(vals - top)  # padded columns hold -inf and give 0
      weights = ex_k / jnp.sum(ex_k, axis=1, keepdims=True)
    else:
      weights, ids, hits = _top_k(probs, top_k, kp)
      weights = jnp.where(lax.broadcasted_iota(jnp.int32, weights.shape, 1) < top_k, weights, 0.)
      if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=1, keepdims=True)
      weights = weights * scale
  row = pl.program_id(0) * bt + lax.broadcasted_iota(jnp.int32, logits.shape, 0)
  picked = sum(hit.astype(jnp.float32) for hit in hits)
  counts_ref[...] = jnp.sum(jnp.where(row < num_tokens, picked, 0.0), axis=0,
                            keepdims=True).astype(jnp.int32)
  w_ref[...], ids_ref[...], probs_ref[...] = weights, ids, probs


def default_block_t(target: Target, num_tokens: int) -> int:
  cap = 256 if target.variant == "mosaic" else 64
  return max(8, min(cap, next_pow2(num_tokens)))


def route(target: Target, logits_TxE, bias_E, *, router: str, top_k: int,
          norm_topk_prob: bool = False, scale: float = 1.0, block_t: int | None = None):
  """(weights_TxK f32, experts_TxK i32, probs_TxE f32, counts_E i32) for float32 logits."""
  if router not in ROUTERS:
    raise ValueError(f"router={router!r}: the fused router kernel supports {ROUTERS}")
  t, e = logits_TxE.shape
  bt = block_t or default_block_t(target, t)
  tp, ep, kp = -(-t // bt) * bt, next_pow2(e), next_pow2(top_k)
  logits = jnp.pad(logits_TxE.astype(jnp.float32), ((0, 0), (0, ep - e)),
                   constant_values=-jnp.inf)
  logits = jnp.pad(logits, ((0, tp - t), (0, 0)))
  bias = jnp.zeros((e,), jnp.float32) if bias_E is None else bias_E.astype(jnp.float32)
  bias = jnp.pad(bias, (0, ep - e), constant_values=-jnp.inf)[None]
  n_tiles = tp // bt
  kernel = functools.partial(_kernel, router=router, top_k=top_k, norm_topk_prob=norm_topk_prob,
                             scale=scale, num_tokens=t)
  rows = lambda cols: pl.BlockSpec((bt, cols), lambda i: (i, 0))
  weights, ids, probs, counts = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((tp, kp), jnp.float32),
                 jax.ShapeDtypeStruct((tp, kp), jnp.int32),
                 jax.ShapeDtypeStruct((tp, ep), jnp.float32),
                 jax.ShapeDtypeStruct((n_tiles, 1, ep), jnp.int32)),
      grid=(n_tiles,),
      in_specs=[rows(ep), pl.BlockSpec((1, ep), lambda i: (0, 0))],
      out_specs=(rows(kp), rows(kp), rows(ep), pl.BlockSpec((None, 1, ep), lambda i: (i, 0, 0))),
      compiler_params=compiler_params(target, ("parallel",)),
      interpret=target.interpret,
      name="fused_router",
  )(logits, bias)
  return (weights[:t, :top_k], ids[:t, :top_k], probs[:t, :e], counts.sum(axis=(0, 1))[:e])
