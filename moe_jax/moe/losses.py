"""Load-balancing losses, without coefficients (the MoE block applies them)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_load(experts_TxK: jax.Array, num_experts: int) -> jax.Array:
  """Fraction of routed assignments per expert, [E], summing to 1 (f_i of Switch)."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[experts_TxK.reshape(-1)].add(1.0)
  return counts / experts_TxK.size


def aux_loss(probs_TxE: jax.Array, experts_TxK: jax.Array, num_experts: int) -> jax.Array:
  """Switch load-balancing loss E * sum_i f_i P_i; equals 1 at perfect balance."""
  return balance_loss(expert_load(experts_TxK, num_experts),
                      probs_TxE.astype(jnp.float32).mean(axis=0))


def balance_loss(load_E: jax.Array, probs_E: jax.Array) -> jax.Array:
  """E * sum_i f_i P_i from the load f (no gradient) and the mean router probability P,
  each over whatever set of tokens the caller means (a shard, a global batch)."""
  return load_E.shape[0] * jnp.sum(jax.lax.stop_gradient(load_E) * probs_E)


def z_loss(logits_TxE: jax.Array) -> jax.Array:
  """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)))


def entropy(probs_TxE: jax.Array) -> jax.Array:
  """Mean per-token entropy of the router distribution (nats)."""
  p = probs_TxE.astype(jnp.float32)
  return -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1))


def router_stats(routing, logits_TxE: jax.Array, cfg, dropped, mean=lambda v: v) -> dict:
  """The MoE block's stats (float32): aux_loss and z_loss with their coefficients, load_E,
  probs_E (the differentiable mean router probability), dropped_fraction and
  router_entropy. `mean` reduces a per-shard value over the batch (expert parallelism:
  a pmean over the batch axes), so the losses are the global batch's."""
  load_E = mean(expert_load(routing.experts_TxK, cfg.num_experts))
  probs_E = mean(routing.probs_TxE.astype(jnp.float32).mean(axis=0))
  return {
      "aux_loss": cfg.aux_loss_coeff * balance_loss(load_E, probs_E),
      "z_loss": cfg.z_loss_coeff * mean(z_loss(logits_TxE)),
      "load_E": load_E,
      "probs_E": probs_E,
      "dropped_fraction": mean(jnp.asarray(dropped, jnp.float32)),
      "router_entropy": mean(entropy(routing.probs_TxE)),
  }
