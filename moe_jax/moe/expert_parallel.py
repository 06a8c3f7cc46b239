"""Expert parallelism: the MoE dispatch inside `jax.shard_map` over the mesh's `expert` axis.

Tokens are sharded over the batch axes (data, fsdp, expert); expert weights over
`expert` on their first dim. Each shard routes its own tokens into a per-expert buffer
[E, C, D], `all_to_all` over `expert` sends every expert's rows to the shard that holds
it ([E_local, n_ep * C, D] there), the local experts run, and a second `all_to_all`
brings the results back for the weighted combine. fsdp- and tensor-sharded weight dims
are gathered on entry (in_specs replicate them). Router statistics are averaged over the
batch axes, so the aux and z losses equal the single-device ones.

Backends: `capacity` keeps its drop semantics with C computed from the shard's tokens
(equal to one device's whenever nothing drops); every dropless backend becomes a padded
all_to_all with C = the shard's token count, the most any expert can receive from one
shard (exact, no drops; E/k times the expert FLOPs of a dense layer of width k*f).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import sharding
from moe_jax.moe import dispatch, losses, routers

EXPERT_AXIS = "expert"


def expert_axis_size(mesh=None) -> int:
  """Size of the `expert` axis of `mesh` (default: the mesh in context); 1 if none."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return dict(mesh.shape)[EXPERT_AXIS]


def _batch_axes(mesh) -> tuple[str, ...]:
  axes = dict(sharding.LOGICAL_RULES)["batch"]
  return tuple(a for a in axes if a in mesh.axis_names)


def _dispatch_local(x_TxD, routing, w_gate, w_up, w_down, cfg, n_ep: int):
  """Capacity buffers, two all_to_alls over `expert`, local experts, weighted combine."""
  t, d = x_TxD.shape
  e, k = cfg.num_experts, routing.experts_TxK.shape[1]
  if cfg.backend in ("capacity", "capacity_einsum"):
    c = dispatch.capacity(t, cfg)
  else:
    c = t  # dropless: one shard sends at most T rows to one expert
  priority = (-routing.weights_TxK.reshape(-1) if cfg.drop_policy == "probability"
              and cfg.backend.startswith("capacity") else None)
  slots = dispatch.sort_slots(routing, e, priority)
  keep = slots.rank_N < c
  dest = jnp.where(keep, slots.expert_N * c + slots.rank_N, e * c)  # e*c = trash row
  token = slots.order_N // k
  buf = jnp.zeros((e * c + 1, d), x_TxD.dtype).at[dest].set(x_TxD[token])[:-1]
  e_loc = e // n_ep
  recv = jax.lax.all_to_all(buf.reshape(e, c, d), EXPERT_AXIS, 0, 0, tiled=True)
  x_local = recv.reshape(n_ep, e_loc, c, d).transpose(1, 0, 2, 3).reshape(e_loc, n_ep * c, d)
  y_local = dispatch.swiglu_experts(x_local, w_gate, w_up, w_down)
  y_back = y_local.reshape(e_loc, n_ep, c, d).transpose(1, 0, 2, 3).reshape(e, c, d)
  y = jax.lax.all_to_all(y_back, EXPERT_AXIS, 0, 0, tiled=True).reshape(e * c, d)
  y = jnp.concatenate([y, jnp.zeros((1, d), y.dtype)])
  w = (routing.weights_TxK.reshape(-1)[slots.order_N] * keep).astype(y.dtype)
  out = jnp.zeros((t, d), y.dtype).at[token].add(y[dest] * w[:, None])
  return out, 1.0 - keep.mean()


def _shard_body(x_TxD, logits_TxE, bias_E, w_gate, w_up, w_down, *, cfg, n_ep, batch_axes,
                dtype, has_bias):
  routing = routers.route(logits_TxE, cfg, bias_E=bias_E if has_bias else None)
  y, dropped = _dispatch_local(x_TxD.astype(dtype), routing, w_gate.astype(dtype),
                               w_up.astype(dtype), w_down.astype(dtype), cfg, n_ep)
  mean = lambda v: jax.lax.pmean(v, batch_axes)
  load_E = mean(losses.expert_load(routing.experts_TxK, cfg.num_experts))
  p_E = mean(routing.probs_TxE.astype(jnp.float32).mean(axis=0))
  aux = cfg.num_experts * jnp.sum(jax.lax.stop_gradient(load_E) * p_E)
  stats = {
      "aux_loss": cfg.aux_loss_coeff * aux,
      "z_loss": cfg.z_loss_coeff * mean(losses.z_loss(logits_TxE)),
      "load_E": load_E,
      "dropped_fraction": mean(jnp.asarray(dropped, jnp.float32)),
      "router_entropy": mean(losses.entropy(routing.probs_TxE)),
  }
  return y, stats


def check_divisible(cfg, mesh) -> None:
  """One-line error when the experts do not split evenly over the `expert` axis."""
  n_ep = expert_axis_size(mesh)
  if cfg.num_experts % n_ep:
    raise ValueError(f"mesh.expert={n_ep} does not divide moe.num_experts={cfg.num_experts}")


def moe_forward_ep(x_TxD, logits_TxE, w_gate, w_up, w_down, cfg, *, bias_E=None,
                   dtype=jnp.float32):
  """Routing, dispatch and combine of moe_forward with the experts spread over the
  `expert` axis of the mesh in context; the router logits come in computed (globally).
  Returns (y_TxD, stats), stats over the global batch."""
  mesh = jax.sharding.get_abstract_mesh()
  check_divisible(cfg, mesh)
  n_ep, batch_axes = expert_axis_size(mesh), _batch_axes(mesh)
  has_bias = bias_E is not None
  bias_E = bias_E if has_bias else jnp.zeros((cfg.num_experts,), jnp.float32)
  body = functools.partial(_shard_body, cfg=cfg, n_ep=n_ep, batch_axes=batch_axes,
                           dtype=dtype, has_bias=has_bias)
  tok, exp = P(batch_axes, None), P(EXPERT_AXIS, None, None)
  stat_specs = dict.fromkeys(("aux_loss", "z_loss", "load_E", "dropped_fraction",
                              "router_entropy"), P())
  fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, P(), exp, exp, exp),
                     out_specs=(tok, stat_specs), check_vma=False)
  return fn(x_TxD, logits_TxE, bias_E, w_gate, w_up, w_down)
