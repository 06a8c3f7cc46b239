"""Expert parallelism: the MoE dispatch inside `jax.shard_map` over the mesh's `expert` axis.

Tokens are sharded over the batch axes (data, fsdp, expert); expert weights over
`expert` on their first dim. Each shard routes its own tokens, `all_to_all` over
`expert` sends every assignment to the shard that holds its expert, the local experts
run, and a second `all_to_all` brings the results back for the weighted combine. fsdp-
and tensor-sharded weight dims are gathered on entry (in_specs replicate them). Router
statistics are averaged over the batch axes, so the aux and z losses are the global-batch
ones, equal to one device's.

Backends:
- `capacity`, `capacity_einsum`: a fixed [E, C, D] buffer per shard with C computed from
  the shard's own T/n tokens (`dispatch.capacity`), so a shard drops what one device with
  the shard's tokens would drop. Equal to the single-device result whenever nothing drops
  (e.g. capacity_factor >= E/k); with drops, which assignments survive depends on the
  split of the batch (per-shard instead of global ranking).
- every dropless backend (`dropless`, `ragged`, and any other): a padded all_to_all, one
  buffer of R = T * min(k, E/n) rows per destination shard (the most one shard can send
  another: each token picks distinct experts), then `dispatch.block_ffn` over the received
  rows grouped by local expert, padding rows skipped. Exact, no drops. XLA:CPU has no
  `ragged_all_to_all` (UNIMPLEMENTED), hence the padding.

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
from moe_jax.moe import dispatch, losses, routers

EXPERT_AXIS = "expert"
CAPACITY_BACKENDS = ("capacity", "capacity_einsum")


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
  """[E, C, D] slot buffers, all_to_all, local experts, all_to_all back, combine."""
  t, d = x_TxD.shape
  e, k = cfg.num_experts, routing.experts_TxK.shape[1]
  c = dispatch.capacity(t, cfg)
  priority = -routing.weights_TxK.reshape(-1) if cfg.drop_policy == "probability" else None
  slots = dispatch.sort_slots(routing, e, priority)
  keep = slots.rank_N < c
  dest = jnp.where(keep, slots.expert_N * c + slots.rank_N, e * c)  # e*c = trash row
  token = slots.order_N // k
  buf = jnp.zeros((e * c + 1, d), x_TxD.dtype).at[dest].set(x_TxD[token])[:-1]
  e_loc = e // n_ep
  recv = _all_to_all(buf.reshape(e, c, d))  # [n_ep sources * E_loc, C, D]
  x_local = recv.reshape(n_ep, e_loc, c, d).transpose(1, 0, 2, 3).reshape(e_loc, n_ep * c, d)
  y_local = dispatch.swiglu_experts(x_local, w_gate, w_up, w_down)
  y_back = y_local.reshape(e_loc, n_ep, c, d).transpose(1, 0, 2, 3).reshape(e, c, d)
  y = jnp.concatenate([_all_to_all(y_back).reshape(e * c, d), jnp.zeros((1, d), x_TxD.dtype)])
  w = (routing.weights_TxK.reshape(-1)[slots.order_N] * keep).astype(y.dtype)
  out = jnp.zeros((t, d), y.dtype).at[token].add(y[dest] * w[:, None])
  return out, 1.0 - keep.mean()


def _local_experts(x_MxD, expert_M, w_gate, w_up, w_down, rows_hint: int):
  """Grouped SwiGLU of received rows: row m through local expert expert_M[m]; rows with
  expert_M == E_loc are padding, sorted last and never computed (zero output)."""
  m, d = x_MxD.shape
  e_loc = w_gate.shape[0]
  routing = routers.Routing(jnp.ones((m, 1), jnp.float32), expert_M[:, None], None)
  slots = dispatch.sort_slots(routing, e_loc + 1)
  block = dispatch.block_size(rows_hint, e_loc)
  num_blocks = -(-(m + (e_loc + 1) * (block - 1)) // block)
  blocks = dispatch.block_layout(slots, e_loc + 1, block, num_blocks)
  real = (slots.sizes_E[:e_loc] + block - 1) // block
  n_blocks = jnp.sum(real).astype(jnp.int32)
  block_expert = jnp.minimum(blocks.block_expert, e_loc - 1)
  buf = jnp.zeros((num_blocks * block, d), x_MxD.dtype).at[blocks.dest_N].set(
      x_MxD[slots.order_N])
  ones = jnp.zeros((num_blocks * block,), x_MxD.dtype).at[blocks.dest_N].set(1.0)
  y = dispatch.block_ffn(buf, ones, w_gate, w_up, w_down, block_expert, n_blocks, block)
  return jnp.zeros((m, d), y.dtype).at[slots.order_N].set(y[blocks.dest_N])


def _dropless_dispatch(x_TxD, routing, w_gate, w_up, w_down, cfg, n_ep: int):
  """Per-destination buffers of R rows, all_to_all (rows and per-expert counts), local
  grouped experts, all_to_all back, weighted combine."""
  t, d = x_TxD.shape
  e, k = cfg.num_experts, routing.experts_TxK.shape[1]
  e_loc = e // n_ep
  r = t * min(k, e_loc)
  slots = dispatch.sort_slots(routing, e)  # grouped by expert, hence by destination shard
  shard_N = slots.expert_N // e_loc
  counts = slots.sizes_E.reshape(n_ep, e_loc)
  shard_start = jnp.cumsum(counts.sum(1)) - counts.sum(1)
  pos_N = jnp.arange(slots.order_N.shape[0], dtype=jnp.int32) - shard_start[shard_N]
  token = slots.order_N // k
  send = jnp.zeros((n_ep, r, d), x_TxD.dtype).at[shard_N, pos_N].set(x_TxD[token])
  recv, recv_counts = _all_to_all(send), _all_to_all(counts)  # [n_ep sources, ...]
  ends = jnp.cumsum(recv_counts, axis=1)  # [n_ep, E_loc]
  row = jnp.arange(r, dtype=jnp.int32)
  expert = jax.vmap(lambda en: jnp.searchsorted(en, row, side="right"))(ends)  # E_loc = pad
  y = _local_experts(recv.reshape(n_ep * r, d), expert.reshape(-1).astype(jnp.int32),
                     w_gate, w_up, w_down, rows_hint=t * k)
  back = _all_to_all(y.reshape(n_ep, r, d))
  w = routing.weights_TxK.reshape(-1)[slots.order_N].astype(back.dtype)
  out = jnp.zeros((t, d), back.dtype).at[token].add(back[shard_N, pos_N] * w[:, None])
  return out, jnp.float32(0.0)


def _shard_body(x_TxD, logits_TxE, bias_E, w_gate, w_up, w_down, *, cfg, n_ep, batch_axes,
                dtype, has_bias):
  routing = routers.route(logits_TxE, cfg, bias_E=bias_E if has_bias else None)
  fn = _capacity_dispatch if cfg.backend in CAPACITY_BACKENDS else _dropless_dispatch
  y, dropped = fn(x_TxD.astype(dtype), routing, w_gate.astype(dtype), w_up.astype(dtype),
                  w_down.astype(dtype), cfg, n_ep)
  mean = lambda v: jax.lax.pmean(v, batch_axes)
  load_E = mean(losses.expert_load(routing.experts_TxK, cfg.num_experts))
  p_E = mean(routing.probs_TxE.astype(jnp.float32).mean(axis=0))
  aux = losses.balance_loss(load_E, p_E)
  stats = {
      "aux_loss": cfg.aux_loss_coeff * aux,
      "z_loss": cfg.z_loss_coeff * mean(losses.z_loss(logits_TxE)),
      "load_E": load_E,
      "probs_E": p_E,
      "dropped_fraction": mean(jnp.asarray(dropped, jnp.float32)),
      "router_entropy": mean(losses.entropy(routing.probs_TxE)),
  }
  return y, stats


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
