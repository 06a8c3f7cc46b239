"""Fused router op: the kernel forward, a plain-jnp backward from the saved outputs.

`route(logits_TxE, cfg, bias_E)` equals moe_jax.moe.routers.route for the routers
topk_softmax, softmax_topk (with or without norm_topk_prob, times topk_scaling_factor) and
sigmoid_bias, and also returns the assignments per expert. Gradients flow to the logits
through the weights and the probabilities; the bias gets none (as in routers.py).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import target as target_lib
from pallas_kernels.router import kernel


class FusedRouting(NamedTuple):
  weights_TxK: jax.Array   # float32 combine weights
  experts_TxK: jax.Array   # int32 expert ids
  probs_TxE: jax.Array     # float32 router distribution
  counts_E: jax.Array      # int32 assignments per expert


class RouterSpec(NamedTuple):
  router: str
  top_k: int
  norm_topk_prob: bool = False
  scale: float = 1.0
  block_t: int | None = None
  target: target_lib.Target | None = None


def route(logits_TxE, cfg, bias_E=None, *, target=None, block_t=None) -> FusedRouting:
  """Fused routing for a MoeConfig-like `cfg` (router, top_k, norm_topk_prob,
  topk_scaling_factor); `target=None` picks the kernel by the lowering platform."""
  spec = RouterSpec(cfg.router, cfg.top_k, bool(cfg.norm_topk_prob),
                    float(cfg.topk_scaling_factor), block_t, target)
  bias = jnp.zeros((logits_TxE.shape[1],), jnp.float32) if bias_E is None else bias_E
  return FusedRouting(*fused_route(logits_TxE.astype(jnp.float32), bias, spec))


def _forward(logits_TxE, bias_E, spec: RouterSpec):
  fn = functools.partial(kernel.route, router=spec.router, top_k=spec.top_k,
                         norm_topk_prob=spec.norm_topk_prob, scale=spec.scale,
                         block_t=spec.block_t)
  return target_lib.dispatch(fn, spec.target, logits_TxE, bias_E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fused_route(logits_TxE, bias_E, spec: RouterSpec):
  """(weights_TxK, experts_TxK, probs_TxE, counts_E)."""
  return _forward(logits_TxE, bias_E, spec)


def _fwd(logits_TxE, bias_E, spec):
  out = _forward(logits_TxE, bias_E, spec)
  weights, experts, probs, _ = out
  return out, (logits_TxE, weights, experts, probs, bias_E)


def _onehot(experts_TxK, num_experts):
  return (experts_TxK[:, :, None] == jnp.arange(num_experts)).astype(jnp.float32)


def _renorm_vjp(dw_TxK, w_TxK, chosen_sum_Tx1, scale):
  """d chosen for w = scale * chosen / sum(chosen)."""
  return (scale * dw_TxK - jnp.sum(dw_TxK * w_TxK, -1, keepdims=True)) / chosen_sum_Tx1


def logits_grad(spec: RouterSpec, logits_TxE, weights_TxK, experts_TxK, probs_TxE,
                dweights_TxK, dprobs_TxE):
  """d loss / d logits from the outputs' cotangents (plain jnp)."""
  onehot = _onehot(experts_TxK, logits_TxE.shape[1])            # [T, K, E]
  scatter = lambda g_TxK: jnp.einsum("tk,tke->te", g_TxK, onehot)
  softmax_vjp = lambda p, dp: p * (dp - jnp.sum(dp * p, -1, keepdims=True))
  if spec.router == "topk_softmax":
    dsel = weights_TxK * (dweights_TxK - jnp.sum(dweights_TxK * weights_TxK, -1, keepdims=True))
    return softmax_vjp(probs_TxE, dprobs_TxE) + scatter(dsel)
  if spec.router == "softmax_topk":
    if spec.norm_topk_prob:
      chosen_sum = jnp.einsum("tke,te->t", onehot, probs_TxE)[:, None]
      dchosen = _renorm_vjp(dweights_TxK, weights_TxK, chosen_sum, spec.scale)
    else:
      dchosen = spec.scale * dweights_TxK
    return softmax_vjp(probs_TxE, dprobs_TxE + scatter(dchosen))
  scores = jax.nn.sigmoid(logits_TxE)                            # sigmoid_bias
  chosen_sum = jnp.einsum("tke,te->t", onehot, scores)[:, None]
  dscores = scatter(_renorm_vjp(dweights_TxK, weights_TxK, chosen_sum, spec.scale))
  total = jnp.sum(scores, -1, keepdims=True)
  dscores += (dprobs_TxE - jnp.sum(dprobs_TxE * probs_TxE, -1, keepdims=True)) / total
  return dscores * scores * (1.0 - scores)


def _bwd(spec, res, cts):
  logits, weights, experts, probs, bias = res
  dweights, _, dprobs, _ = cts
  dlogits = logits_grad(spec, logits, weights, experts, probs, dweights, dprobs)
  return dlogits.astype(logits.dtype), jnp.zeros_like(bias)


fused_route.defvjp(_fwd, _bwd)
