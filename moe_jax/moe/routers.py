"""Routers: logits -> (weights, expert ids), in float32. One function per name.

Formulas: ../shared/METHODS.md ("Routing orders"). Each returns a `Routing`:
`weights_TxK` >= 0, `experts_TxK` distinct per token, and `probs_TxE`, the full
distribution used by the aux loss and the entropy statistic.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  weights_TxK: jax.Array   # float32 combine weights
  experts_TxK: jax.Array   # int32 expert ids
  probs_TxE: jax.Array     # float32 router distribution


def topk_softmax(logits_TxE, cfg, bias_E=None) -> Routing:
  """Mixtral: top-k logits, softmax over those k (weights sum to 1)."""
  del bias_E
  top_v, top_i = jax.lax.top_k(logits_TxE, cfg.top_k)
  return Routing(jax.nn.softmax(top_v, axis=-1), top_i.astype(jnp.int32),
                 jax.nn.softmax(logits_TxE, axis=-1))


def softmax_topk(logits_TxE, cfg, bias_E=None) -> Routing:
  """Softmax over all E, keep the top-k probabilities, optionally renormalise, then scale."""
  del bias_E
  probs = jax.nn.softmax(logits_TxE, axis=-1)
  top_p, top_i = jax.lax.top_k(probs, cfg.top_k)
  if cfg.norm_topk_prob:
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  return Routing(top_p * cfg.topk_scaling_factor, top_i.astype(jnp.int32), probs)


def sigmoid_bias(logits_TxE, cfg, bias_E=None) -> Routing:
  """DeepSeek-V3: choose on sigmoid(logits) + bias, weight by the pre-bias scores
  normalised over the chosen, times `topk_scaling_factor`. The bias has no gradient."""
  scores = jax.nn.sigmoid(logits_TxE)
  bias = jnp.zeros(scores.shape[-1], scores.dtype) if bias_E is None else bias_E
  _, top_i = jax.lax.top_k(scores + jax.lax.stop_gradient(bias), cfg.top_k)
  top_s = jnp.take_along_axis(scores, top_i, axis=-1)
  weights = top_s / jnp.sum(top_s, axis=-1, keepdims=True) * cfg.topk_scaling_factor
  return Routing(weights, top_i.astype(jnp.int32), scores / jnp.sum(scores, -1, keepdims=True))


def expert_choice_capacity(num_tokens: int, cfg) -> int:
  return min(num_tokens, max(1, math.ceil(num_tokens * cfg.top_k / cfg.num_experts
                                          * cfg.capacity_factor)))


def expert_choice(logits_TxE, cfg, bias_E=None) -> Routing:
  """Each expert takes its top-C tokens by probability (not causal: for encoders and
  analysis). Returned token-major with K = E slots: slot e holds expert e, with weight
  probs[t, e] if expert e chose token t, else 0."""
  del bias_E
  probs = jax.nn.softmax(logits_TxE, axis=-1)
  num_tokens, num_experts = probs.shape
  c = expert_choice_capacity(num_tokens, cfg)
  _, tok_ExC = jax.lax.top_k(probs.T, c)
  chosen = jnp.zeros((num_experts, num_tokens), bool).at[
      jnp.arange(num_experts)[:, None], tok_ExC].set(True).T
  experts = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), probs.shape)
  return Routing(jnp.where(chosen, probs, 0.0), experts, probs)


ROUTERS = {"topk_softmax": topk_softmax, "softmax_topk": softmax_topk,
           "sigmoid_bias": sigmoid_bias, "expert_choice": expert_choice}
# Each token picks its own experts: what a causal decoder can route with (expert_choice
# lets an expert pick among all of a batch's tokens, later ones included).
TOKEN_CHOICE = ("topk_softmax", "softmax_topk", "sigmoid_bias")


def route(logits_TxE: jax.Array, cfg, *, bias_E: jax.Array | None = None) -> Routing:
  """Dispatches on `cfg.router`; computes in float32 whatever the input dtype."""
  return ROUTERS[cfg.router](logits_TxE.astype(jnp.float32), cfg, bias_E)
