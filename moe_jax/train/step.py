"""The training and evaluation steps: pure in their inputs, jitted once."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import sharding
from moe_jax.models import layer_stack
from moe_jax.moe import losses
from moe_jax.moe.layer import update_router_bias
from moe_jax.train import optim


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
  """DeepSeek-V3 bias balancing, outside the gradient: b_i += rate * sign(mean - load_i),
  for blocks stored per layer or stacked (one row per layer: layer_stack.groups)."""
  for block, ids in layer_stack.groups(model.layers):
    mlp = block.mlp
    if not hasattr(mlp, "router_bias"):
      continue
    load = (moe_stats[ids]["load_E"] if isinstance(ids, int)
            else jnp.stack([moe_stats[i]["load_E"] for i in ids]))
    mlp.router_bias[...] = update_router_bias(mlp.router_bias[...], load,
                                              mlp.cfg.bias_update_rate)


def make_optimizer(model, opt: optim.OptimConfig, mesh=None) -> nnx.Optimizer:
  """AdamW state for `model`'s params, created sharded like the params over `mesh`."""
  tx = optim.make_tx(opt)  # one object per update rule: train_step compiles once for it
  if mesh is None:
    return nnx.Optimizer(model, tx, wrt=nnx.Param)
  return sharding.init_sharded(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param), mesh, model)


def all_finite(tree) -> jax.Array:
  """One boolean: no leaf of `tree` holds a NaN or an Inf."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@nnx.jit(donate_argnums=(0, 1), static_argnames=("accum",))
def train_step(model, optimizer: nnx.Optimizer, batch: dict, rng: jax.Array, lr: jax.Array,
               accum: int = 1):
  """One optimiser step at learning rate `lr` (a scalar: one program serves any schedule);
  returns scalar metrics and per-layer router statistics. `accum` > 1 splits the batch
  into that many microbatches (grad_accumulate) for the same update."""
  if accum > 1:
    (loss, metrics), grads = grad_accumulate(model, batch, rng, accum)
  else:
    grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch, train=True, key=rng), has_aux=True)
    (loss, metrics), grads = grad_fn(model)
  optimizer.update(model, grads, lr=lr)
  update_router_biases(model, metrics["moe"])
  metrics.update(loss=loss, grad_norm=optax.global_norm(grads),
                 params_finite=all_finite(nnx.state(model, nnx.Param)))
  return _replicated(metrics)


def microbatches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...], microbatch j holding rows j, j+k, j+2k, ...: each device's
  block of rows (the batch is sharded over its rows) splits evenly among the microbatches."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                      batch)


def _layer_aux(model, load_E: jax.Array, probs_E: jax.Array) -> jax.Array:
  """An MoE layer's balance loss (every MoE layer has the model's MoE config)."""
  return model.cfg.moe.aux_loss_coeff * losses.balance_loss(load_E, probs_E)


def grad_accumulate(model, batch: dict, rng: jax.Array, k: int):
  """((loss, metrics), grads) of the whole batch from `k` microbatches, one at a time
  (lax.scan): the same update as one step on the batch (dropless dispatch, no router
  jitter). The load-balancing loss is the global batch's (Megatron's global aux loss):
  E * sum_i f_i P_i with f the expert load over all k microbatches, from a first
  forward pass, and P the mean router probability over all of them, so that each
  microbatch's share of the gradient is E * f_i * dP_i^j / k. Averaging each microbatch's
  own aux loss (its own f) would optimise a different objective. z-loss and
  cross-entropy are means over all tokens, split exactly. Costs one extra forward."""
  micro = microbatches(batch, k)
  keys = jax.random.split(rng, k)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.maximum(batch["loss_mask"].sum(), 1.0)

  def forward(p, mb, key):
    m = nnx.merge(graphdef, p, rest)
    return m(mb["tokens"], mb["positions"], mb["segment_ids"], train=True, key=key)

  loads = jax.lax.map(lambda a: {i: s["load_E"] for i, s in forward(params, *a)[1]["moe"].items()},
                      (micro, keys))
  load_E = jax.tree.map(lambda x: x.mean(axis=0), loads)

  def micro_loss(p, mb, key):
    logits, aux = forward(p, mb, key)
    ce = (token_nll(logits, mb["targets"]) * mb["loss_mask"]).sum() / tokens
    moe = aux["moe"]
    aux_loss = sum((_layer_aux(model, load_E[i], s["probs_E"]) for i, s in moe.items()),
                   jnp.float32(0)) / k
    z = sum((s["z_loss"] for s in moe.values()), jnp.float32(0)) / k
    return ce + aux_loss + z, (ce, aux_loss, z, moe, aux["moa"])

  def body(acc, a):
    (loss, out), g = jax.value_and_grad(micro_loss, has_aux=True)(params, *a)
    return jax.tree.map(jnp.add, acc, g), (loss, out)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (micro_losses, (ce, aux_loss, z, moe, moa)) = jax.lax.scan(body, zeros, (micro, keys))
  mean = lambda tree: jax.tree.map(lambda x: x.mean(axis=0), tree)
  moe, moa = mean(moe), mean(moa)
  for i in moe:  # the global batch's statistics (aux at the global load and probs)
    moe[i]["load_E"] = load_E[i]
    moe[i]["aux_loss"] = _layer_aux(model, load_E[i], moe[i]["probs_E"])
  metrics = {"ce": ce.sum(), "aux_loss": aux_loss.sum(), "z_loss": z.sum(),
             "tokens": batch["loss_mask"].sum(), "moe": moe, "moa": moa}
  return (micro_losses.sum(), metrics), grads


@nnx.jit
def eval_step(model, batch: dict):
  """(summed masked NLL, token count) for one batch, no router noise."""
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], train=False)
  mask = batch["loss_mask"]
  return _replicated(((token_nll(logits, batch["targets"]) * mask).sum(), mask.sum()))


def _replicated(tree):
  """Metrics whole on every device (readable on every process of a multi-host run)."""
  return jax.tree.map(lambda x: sharding.constrain(x, ()), tree)
