"""The training and evaluation steps: pure in their inputs, jitted once."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import sharding


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def loss_fn(model, batch: dict, *, train: bool = True, key: jax.Array | None = None):
  """Masked next-token cross-entropy plus every MoE layer's aux and z losses (the
  attention experts' router has none: BAM)."""
  logits, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], train=train,
                      key=key)
  mask = batch["loss_mask"]
  n = jnp.maximum(mask.sum(), 1.0)
  ce = (token_nll(logits, batch["targets"]) * mask).sum() / n
  moe = aux["moe"]
  aux_loss = sum((s["aux_loss"] for s in moe.values()), jnp.float32(0))
  z_loss = sum((s["z_loss"] for s in moe.values()), jnp.float32(0))
  return ce + aux_loss + z_loss, {"ce": ce, "aux_loss": aux_loss, "z_loss": z_loss,
                                  "tokens": mask.sum(), "moe": moe, "moa": aux["moa"]}


def update_router_biases(model, moe_stats: dict) -> None:
  """DeepSeek-V3 bias balancing, outside the gradient: b_i += rate * sign(mean - load_i)."""
  from moe_jax.moe.layer import update_router_bias  # pylint: disable=g-import-not-at-top
  for i, stats in moe_stats.items():
    block = model.layers[i].mlp
    if hasattr(block, "router_bias"):
      block.router_bias[...] = update_router_bias(block.router_bias[...], stats["load_E"],
                                                  block.cfg.bias_update_rate)


def all_finite(tree) -> jax.Array:
  """One boolean: no leaf of `tree` holds a NaN or an Inf."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@nnx.jit(donate_argnums=(0, 1))
def train_step(model, optimizer: nnx.Optimizer, batch: dict, rng: jax.Array, lr: jax.Array):
  """One optimiser step at learning rate `lr` (a scalar: one program serves any schedule);
  returns scalar metrics and per-layer router statistics."""
  grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch, train=True, key=rng), has_aux=True)
  (loss, metrics), grads = grad_fn(model)
  optimizer.update(model, grads, lr=lr)
  update_router_biases(model, metrics["moe"])
  metrics.update(loss=loss, grad_norm=optax.global_norm(grads),
                 params_finite=all_finite(nnx.state(model, nnx.Param)))
  return _replicated(metrics)


@nnx.jit
def eval_step(model, batch: dict):
  """(summed masked NLL, token count) for one batch, no router noise."""
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], train=False)
  mask = batch["loss_mask"]
  return _replicated(((token_nll(logits, batch["targets"]) * mask).sum(), mask.sum()))


def _replicated(tree):
  """Metrics whole on every device (readable on every process of a multi-host run)."""
  return jax.tree.map(lambda x: sharding.constrain(x, ()), tree)
