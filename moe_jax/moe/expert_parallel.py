"""Expert parallelism: the MoE dispatch inside `jax.shard_map` over the mesh's `expert` axis.

Tokens are sharded over the batch axes (data, fsdp, expert); expert weights over
`expert` on their first dim. Each shard routes its own tokens, `all_to_all` over
`expert` sends every assignment to the shard that holds its expert, the local experts
run, and a second `all_to_all` brings the results back for the weighted combine. fsdp-
and tensor-sharded weight dims are gathered on entry (in_specs replicate them). Router
statistics are averaged over the batch axes, so the aux and z losses are the global-batch
ones, equal to one device's.

Backends:
- every capacity backend (dispatch.CAPACITY_BACKENDS): a fixed [E, C, D] buffer per
  shard with C computed from the shard's own T/n tokens (`dispatch.capacity`), so a
  shard drops what one device with the shard's tokens would drop. Equal to the
  single-device result whenever nothing drops (e.g. capacity_factor >= E/k); with drops,
  which assignments survive depends on the split of the batch (per-shard instead of
  global ranking).
- every dropless backend (`dropless`, `ragged`, `pallas`): a padded all_to_all, one
  buffer of R = T * min(k, E/n) rows per destination shard (the most one shard can send
  another: each token picks distinct experts), then the received rows grouped by local
  expert through `dispatch.grouped_rows`: `grouped_swiglu`, or for `pallas` the Pallas grouped
  matmul; padding rows skipped. Exact, no drops. XLA:CPU has no `ragged_all_to_all`
  (UNIMPLEMENTED), hence the padding.

Each path is the single-device one (dispatch.py: a layout, the experts, the combine) with
the all_to_all pair between the layout and the experts; the router statistics are
`losses.router_stats` with a pmean over the batch axes.

Routers run per shard on the shard's tokens: token-choice routers are unaffected;
`expert_choice` picks each expert's top tokens among the shard's own.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import sharding
from moe_jax.models import layers
from moe_jax.moe import dispatch, losses, routers

EXPERT_AXIS = "expert"


def expert_axis_size(mesh=None) -> int:
  """Size of the `expert` axis of `mesh` (default: the mesh in context); 1 if none."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return dict(mesh.shape)[EXPERT_AXIS]


def enabled(num_tokens: int, mesh=None) -> bool:
  """Whether moe_forward dispatches expert-parallel: an `expert` axis > 1 in the mesh (in
  context) and tokens that split evenly over the batch axes (else, e.g. generating one
  sequence, the local dispatch runs with the expert weights gathered)."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if expert_axis_size(mesh) == 1:
    return False
  return num_tokens % math.prod(dict(mesh.shape)[a] for a in sharding.batch_axes(mesh)) == 0


def check_divisible(cfg, mesh) -> None:
  """One-line error when the experts do not split evenly over the `expert` axis."""
  n_ep = expert_axis_size(mesh)
  if cfg.num_experts % n_ep:
    raise ValueError(f"mesh.expert={n_ep} does not divide moe.num_experts={cfg.num_experts}")


def _all_to_all(x):
  return jax.lax.all_to_all(x, EXPERT_AXIS, 0, 0, tiled=True)


def _capacity_dispatch(x_TxD, routing, w_gate, w_up, w_down, cfg, n_ep: int):
  """The capacity layout ([E, C, D] slots), all_to_all, the local experts, all_to_all
  back, the combine: capacity_gather with the experts spread over the shards."""
  t, d = x_TxD.shape
  e, e_loc = cfg.num_experts, cfg.num_experts // n_ep
  layout, kept, c = dispatch.capacity_layout(routing, cfg)
  recv = _all_to_all(dispatch.gather(x_TxD, layout).reshape(e, c, d))  # [n_ep * E_loc, C, D]
  x_local = recv.reshape(n_ep, e_loc, c, d).transpose(1, 0, 2, 3).reshape(e_loc, n_ep * c, d)
  y_local = layers.swiglu(x_local, w_gate, w_up, w_down)
  y_back = y_local.reshape(e_loc, n_ep, c, d).transpose(1, 0, 2, 3).reshape(e, c, d)
  return dispatch.combine(_all_to_all(y_back).reshape(e * c, d), layout, t), 1.0 - kept


def shard_layout(routing, num_experts: int, n_ep: int) -> tuple[dispatch.Layout, jax.Array]:
  """(layout into n_ep buffers of R = T * min(k, E_loc) rows, one per destination shard,
  the per-expert counts [n_ep, E_loc]): R is the most one shard can send another, as a
  token picks distinct experts."""
  t, k = routing.experts_TxK.shape
  e_loc = num_experts // n_ep
  r = t * min(k, e_loc)
  slots = dispatch.sort_slots(routing, num_experts)  # grouped by expert, so by shard
  shard_N = slots.expert_N // e_loc
  counts = slots.sizes_E.reshape(n_ep, e_loc)
  shard_start = jnp.cumsum(counts.sum(1)) - counts.sum(1)
  pos_N = jnp.arange(slots.order_N.shape[0], dtype=jnp.int32) - shard_start[shard_N]
  weight_N = routing.weights_TxK.reshape(-1)[slots.order_N]
  return dispatch.Layout(slots.order_N, shard_N * r + pos_N, weight_N, n_ep * r, k), counts


def _dropless_dispatch(x_TxD, routing, w_gate, w_up, w_down, cfg, n_ep: int):
  """The per-shard layout, all_to_all (rows and per-expert counts), the local experts
  grouped by expert (dispatch.grouped_rows: grouped_swiglu, or the Pallas grouped matmul),
  all_to_all back, the weighted combine."""
  t, d = x_TxD.shape
  layout, counts = shard_layout(routing, cfg.num_experts, n_ep)
  r = layout.rows // n_ep
  recv = _all_to_all(dispatch.gather(x_TxD, layout).reshape(n_ep, r, d))
  ends = jnp.cumsum(_all_to_all(counts), axis=1)  # [n_ep sources, E_loc]
  row = jnp.arange(r, dtype=jnp.int32)
  expert = jax.vmap(lambda en: jnp.searchsorted(en, row, side="right"))(ends)  # E_loc = pad
  y = dispatch.grouped_rows(recv.reshape(n_ep * r, d), expert.reshape(-1).astype(jnp.int32),
                            w_gate, w_up, w_down, cfg.backend, rows_hint=t * layout.k)
  back = _all_to_all(y.reshape(n_ep, r, d)).reshape(n_ep * r, d)
  return dispatch.combine(back, layout, t), jnp.float32(0.0)


def _shard_body(x_TxD, logits_TxE, bias_E, w_gate, w_up, w_down, *, cfg, n_ep, batch_axes,
                dtype, has_bias):
  routing = routers.route(logits_TxE, cfg, bias_E=bias_E if has_bias else None)
  fn = _capacity_dispatch if cfg.backend in dispatch.CAPACITY_BACKENDS else _dropless_dispatch
  y, dropped = fn(x_TxD.astype(dtype), routing, w_gate.astype(dtype), w_up.astype(dtype),
                  w_down.astype(dtype), cfg, n_ep)
  return y, losses.router_stats(routing, logits_TxE, cfg, dropped,
                                mean=lambda v: jax.lax.pmean(v, batch_axes))


def moe_forward_ep(x_TxD, logits_TxE, w_gate, w_up, w_down, cfg, *, bias_E=None,
                   dtype=jnp.float32):
  """Routing, dispatch and combine of moe_forward with the experts spread over the
  `expert` axis of the mesh in context; the router logits come in computed (globally).
  Returns (y_TxD, stats), stats over the global batch."""
  mesh = jax.sharding.get_abstract_mesh()
  check_divisible(cfg, mesh)
  n_ep, batch_axes = expert_axis_size(mesh), sharding.batch_axes(mesh)
  has_bias = bias_E is not None
  bias_E = bias_E if has_bias else jnp.zeros((cfg.num_experts,), jnp.float32)
  body = functools.partial(_shard_body, cfg=cfg, n_ep=n_ep, batch_axes=batch_axes,
                           dtype=dtype, has_bias=has_bias)
  tok, exp = P(batch_axes, None), P(EXPERT_AXIS, None, None)
  stat_specs = dict.fromkeys(("aux_loss", "z_loss", "load_E", "probs_E", "dropped_fraction",
                              "router_entropy"), P())
  fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, P(), exp, exp, exp),
                     out_specs=(tok, stat_specs), check_vma=False)
  return fn(x_TxD, logits_TxE, bias_E, w_gate, w_up, w_down)
