"""Dispatch backends: route tokens to experts, run the expert SwiGLUs, combine.

Every backend has the signature
  fn(x_TxD, routing, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, cfg) -> (y_TxD, dropped_fraction)
and is registered in BACKENDS by name (the Pallas backend plugs in the same way). Each is
three steps: a layout (`Layout`: each assignment's row in a buffer, and its weight), the
experts on that buffer, and the combine back to tokens. Expert parallelism
(expert_parallel.py) reuses the layouts and combine and puts its all_to_all pair between
the layout and the experts.

- `capacity`: C = ceil(T*k/E * capacity_factor) slots per expert; assignments beyond C
  are dropped by probability or by position. `capacity_grouped` on CPU, `capacity_gather`
  on GPU/TPU (`capacity_dispatch`).
- `capacity_gather`: sort-based gather into an [E, C, D] buffer and batched matmuls (the
  FLOPs of a dense FFN of width k*f at capacity_factor 1; static shapes).
- `capacity_grouped`: the kept assignments through dropless's block loop, the dropped
  ones never computed.
- `capacity_einsum`: the same semantics with one-hot dispatch/combine einsums (the
  textbook formulation; O(T*E*C*D), a reference for tests and small shapes).
- `dropless`: sort assignments by expert, cut each group into blocks of decreasing size,
  then a fused per-block SwiGLU loop over the occupied blocks only, with a custom VJP. On CPU
  this runs near dense speed; `jax.lax.ragged_dot` expands to a masked dense matmul there.
- `ragged`: dropless via `jax.lax.ragged_dot` (the reference grouped matmul).
- `pallas`: dropless on the Pallas kernels (pallas_backend.py); interpreted on CPU.
- `auto`: `pallas` on GPU/TPU, `dropless` on CPU, resolved when traced (`resolve_backend`).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.models import layers
from moe_jax.moe.routers import Routing


def capacity(num_tokens: int, cfg) -> int:
  """C = ceil(T * k / E * capacity_factor)."""
  return max(1, math.ceil(num_tokens * cfg.top_k / cfg.num_experts * cfg.capacity_factor))


class Slots(NamedTuple):
  """Assignments (T*K of them) sorted by expert, with each one's rank in its expert."""
  order_N: jax.Array       # assignment index (t*K + k) of each sorted position
  expert_N: jax.Array      # expert of each sorted position
  rank_N: jax.Array        # position within its expert's group
  sizes_E: jax.Array       # assignments per expert


def sort_slots(routing: Routing, num_experts: int, priority_N: jax.Array | None = None) -> Slots:
  """Groups assignments by expert; within an expert, by `priority_N` (ascending) if given,
  else by token position."""
  experts_N = routing.experts_TxK.reshape(-1)
  n = experts_N.shape[0]
  if priority_N is None and num_experts * n <= jnp.iinfo(jnp.int32).max:
    # One int32 key, expert * n + position, is unique, so an unstable sort of it is the
    # stable argsort by expert: on CPU a third of the time of an argsort (a sort of the
    # keys with an index operand compared through its comparator).
    key_N = jnp.sort(experts_N.astype(jnp.int32) * n + jnp.arange(n, dtype=jnp.int32))
    order, expert_sorted = key_N % n, key_N // n
  else:
    order = (jnp.argsort(experts_N, stable=True) if priority_N is None
             else jnp.lexsort((priority_N, experts_N)))
    expert_sorted = experts_N[order]
  sizes = jnp.zeros((num_experts,), jnp.int32).at[experts_N].add(1)
  starts = jnp.cumsum(sizes) - sizes
  rank = jnp.arange(n, dtype=jnp.int32) - starts[expert_sorted]
  return Slots(order.astype(jnp.int32), expert_sorted, rank, sizes)


class Layout(NamedTuple):
  """Where each routed assignment (sorted by expert) goes in a [rows, D] buffer, and how
  its result comes back: the layout step every backend and expert parallelism share."""
  order_N: jax.Array    # the assignment (t * K + k) of each sorted position
  dest_N: jax.Array     # its row in the buffer; `rows` (one past the end) = dropped
  weight_N: jax.Array   # its combine weight, 0 where dropped
  rows: int             # buffer rows (static)
  k: int                # assignments per token (static)

  @property
  def token_N(self) -> jax.Array:
    return self.order_N // self.k


def _row_maps(layout: Layout) -> tuple[jax.Array, jax.Array]:
  """(dest_A: each assignment's buffer row, in assignment order t * K + k, `rows` where
  dropped; assign_R: each buffer row's assignment, N where the row is empty). Every
  layout sends an assignment to at most one row and a row holds at most one, so moving
  rows either way is a gather (index maps of N int32s, not rows of D floats, are
  scattered)."""
  n = layout.order_N.shape[0]
  dest_A = jnp.zeros((n,), jnp.int32).at[layout.order_N].set(layout.dest_N.astype(jnp.int32))
  return dest_A, _assignments(layout)


def _assignments(layout: Layout) -> jax.Array:
  """assign_R: each buffer row's assignment, N where the row is empty (or dropped)."""
  n = layout.order_N.shape[0]
  return jnp.full((layout.rows + 1,), n, jnp.int32).at[layout.dest_N].set(
      layout.order_N.astype(jnp.int32))[:-1]


def _sources(assign_R: jax.Array, k: int, num_sources: int) -> jax.Array:
  """src_R: the source (token) of each buffer row's assignment, num_sources (one past the
  end: a zero row to _get_rows, dropped by _add_rows) where the row is empty."""
  return jnp.where(assign_R < num_sources * k, assign_R // k, num_sources)


def _get_rows(x_MxD, index):
  """x[index[i]], zero where index[i] >= M (one past the end marks an empty or dropped
  row). Read in place: appending a zero row to index into cost a fresh [M + 1, D] copy of
  x on every call."""
  return x_MxD.at[index].get(mode="fill", fill_value=0)


def _sum_rows(y_RxD, dest_SxK, w_SxK=None):
  """[S, D]: source s's rows dest_SxK[s] summed, each times w_SxK where given (`rows`, one
  past the end, adds nothing)."""
  s, k = dest_SxK.shape
  y_SxKxD = _get_rows(y_RxD, dest_SxK.reshape(-1)).reshape(s, k, -1)
  return (y_SxKxD if w_SxK is None else y_SxKxD * w_SxK[..., None]).sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _to_rows(x_TxD, dest_A, assign_R, k: int):
  """[R, D]: row r is token assign_R[r] // k (zero for an empty row)."""
  return _get_rows(x_TxD, _sources(assign_R, k, x_TxD.shape[0]))


def _to_rows_fwd(x_TxD, dest_A, assign_R, k):
  return _to_rows(x_TxD, dest_A, assign_R, k), (dest_A, assign_R, x_TxD.shape[0])


def _to_rows_bwd(k, res, g_RxD):
  dest_A, assign_R, t = res  # token t's gradient: the sum of its k rows (a gather, no scatter)
  return _sum_rows(g_RxD, dest_A.reshape(t, k)), None, None


_to_rows.defvjp(_to_rows_fwd, _to_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _from_rows(y_RxD, w_A, dest_A, assign_R, k: int):
  """[T, D]: the sum over token t's k assignments a of w_A[a] * y[dest_A[a]]."""
  t = dest_A.shape[0] // k
  return _sum_rows(y_RxD, dest_A.reshape(t, k), w_A.reshape(t, k))


def _from_rows_fwd(y_RxD, w_A, dest_A, assign_R, k):
  return _from_rows(y_RxD, w_A, dest_A, assign_R, k), (y_RxD, w_A, dest_A, assign_R)


def _from_rows_bwd(k, res, dy_TxD):
  y_RxD, w_A, dest_A, assign_R = res
  dy_A = jnp.repeat(dy_TxD, k, axis=0)  # assignment a = t * k + j belongs to token t
  dw_A = jnp.sum(_get_rows(y_RxD, dest_A) * dy_A, axis=-1).astype(w_A.dtype)
  dy_R = _get_rows(dy_A * w_A[:, None].astype(dy_A.dtype), assign_R)
  return dy_R, dw_A, None, None


_from_rows.defvjp(_from_rows_fwd, _from_rows_bwd)


def gather(x_TxD: jax.Array, layout: Layout) -> jax.Array:
  """[rows, D]: each assignment's token row at its destination; unused rows are zero."""
  dest_A, assign_R = _row_maps(layout)
  return _to_rows(x_TxD, dest_A, assign_R, layout.k)


def combine(y_RxD: jax.Array, layout: Layout, num_tokens: int, weighted: bool = True) -> jax.Array:
  """[T, D]: the sum over each token's assignments of its buffer row (times its weight)."""
  dest_A, assign_R = _row_maps(layout)
  n = layout.order_N.shape[0]
  if n != num_tokens * layout.k:
    raise ValueError(f"combine: {n} assignments for {num_tokens} tokens of k={layout.k}")
  w_A = (jnp.zeros((n,), y_RxD.dtype).at[layout.order_N].set(layout.weight_N.astype(y_RxD.dtype))
         if weighted else jnp.ones((n,), y_RxD.dtype))
  return _from_rows(y_RxD, w_A, dest_A, assign_R, layout.k)


def _capacity_slots(routing, cfg) -> tuple[Slots, jax.Array, int]:
  """(slots sorted by expert and, within one, by drop priority; keep_N, whether each sorted
  assignment is within its expert's C slots; C)."""
  c = capacity(routing.experts_TxK.shape[0], cfg)
  priority = -routing.weights_TxK.reshape(-1) if cfg.drop_policy == "probability" else None
  slots = sort_slots(routing, cfg.num_experts, priority)
  return slots, slots.rank_N < c, c


def capacity_layout(routing, cfg) -> tuple[Layout, jax.Array, int]:
  """(layout into [E * C] rows, expert-major, kept fraction, C): C slots per expert,
  assignments beyond C dropped by probability or by position (cfg.drop_policy)."""
  k, e = routing.experts_TxK.shape[1], cfg.num_experts
  slots, keep, c = _capacity_slots(routing, cfg)
  dest = jnp.where(keep, slots.expert_N * c + slots.rank_N, e * c)
  weight = routing.weights_TxK.reshape(-1)[slots.order_N] * keep
  return Layout(slots.order_N, dest, weight, e * c, k), keep.mean(), c


def capacity_gather(x_TxD, routing, w_gate, w_up, w_down, cfg):
  """Capacity dispatch by sort + gather into [E, C, D]; dropped assignments add nothing."""
  t, d = x_TxD.shape
  layout, kept, c = capacity_layout(routing, cfg)
  x_ExCxD = gather(x_TxD, layout).reshape(cfg.num_experts, c, d)
  y_ExCxD = layers.swiglu(x_ExCxD, w_gate, w_up, w_down)  # [E, C, D] x [E, D, F]: batched
  return combine(y_ExCxD.reshape(-1, d), layout, t), 1.0 - kept


def capacity_einsum(x_TxD, routing, w_gate, w_up, w_down, cfg):
  """Capacity dispatch with one-hot [T, E, C] dispatch and combine tensors."""
  t, _ = x_TxD.shape
  k, e = routing.experts_TxK.shape[1], cfg.num_experts
  layout, kept, c = capacity_layout(routing, cfg)
  dest_N = jnp.zeros_like(layout.dest_N).at[layout.order_N].set(layout.dest_N)  # token order
  onehot = jax.nn.one_hot(dest_N, e * c).reshape(t, k, e, c)  # a dropped one (e*c): zeros
  dispatch_TxExC = onehot.sum(axis=1).astype(x_TxD.dtype)
  combine_TxExC = (onehot * routing.weights_TxK[:, :, None, None]).sum(axis=1).astype(x_TxD.dtype)
  x_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC, x_TxD)
  y_ExCxD = layers.swiglu(x_ExCxD, w_gate, w_up, w_down)
  return jnp.einsum("tec,ecd->td", combine_TxExC, y_ExCxD), 1.0 - kept


# ---------------------------------------------------------------- dropless, CPU fast path

# The largest block of the CPU block loop by default (docs/benchmarks.md, "An Intel Xeon
# host": fewer loop iterations for a little padding).
MAX_BLOCK = 1024


def block_size(num_assignments: int, num_experts: int, max_block: int = MAX_BLOCK) -> int:
  """Rows per block: the next power of two of the mean group size, in [8, max_block]."""
  mean = max(1, num_assignments // num_experts)
  return int(min(max_block, max(8, 1 << (mean - 1).bit_length())))


def block_levels(num_assignments: int, num_experts: int, max_block: int = MAX_BLOCK,
                 ratio: int = 2, depth: int = 4) -> tuple[int, ...]:
  """Block sizes, largest first: `block_size`, then each `ratio` times smaller, down to
  8 rows and at most `depth` of them. An expert's group is padded to a whole number of
  the smallest blocks and cut into as many of the largest as fit, then of the next
  (block_layout): at most smallest - 1 padding rows per expert, where one block size
  pads up to largest - 1 (a quarter of the rows at 64 fine-grained experts).

  Each iteration of the block loop costs a fixed price on CPU besides its products
  (slicing the expert's weights, gathering and scattering the rows, dispatching each
  op to the threads), so the defaults trade a little padding (less than an eighth of
  the largest block per expert) for few iterations: with ratio 2, after as many of the
  largest blocks as fit, an expert has at most one block of each smaller level
  (block_layout). Measured in docs/benchmarks.md ("An Intel Xeon host")."""
  levels = [block_size(num_assignments, num_experts, max_block)]
  while len(levels) < depth and levels[-1] // ratio >= 8:
    levels.append(levels[-1] // ratio)
  return tuple(levels)


class BlockLoop(NamedTuple):
  """What the block loop needs of a routing, per level of `block_levels` (all traced):
  the buffer holds one region per level, cut into blocks of that level's size."""
  block_expert: tuple           # the expert of each block
  n_blocks: tuple               # occupied blocks (scalars)
  offsets: tuple                # first row (scalars)


class Blocks(NamedTuple):
  dest_N: jax.Array             # row of each sorted assignment in the padded buffer
  loop: BlockLoop


def _level_units(levels: tuple[int, ...]) -> list[int]:
  """Each level's block size in blocks of the smallest (every level is a multiple of it)."""
  if any(size % levels[-1] for size in levels) or list(levels) != sorted(set(levels))[::-1]:
    raise ValueError(f"block levels {levels}: expected decreasing multiples of the last")
  return [size // levels[-1] for size in levels]


def _buffer_rows(n: int, num_groups: int, levels: tuple[int, ...]) -> int:
  """The most rows any routing of n assignments into num_groups groups pads to: each
  group pads to less than one smallest block."""
  return n + num_groups * (levels[-1] - 1)


def _region_bounds(n: int, num_groups: int, levels: tuple[int, ...]) -> list[int]:
  """Blocks each level can need, over any split of n assignments into num_groups groups:
  every group pads to less than one smallest block, so level j holds at most
  (n + num_groups * (smallest - 1)) // levels[j] blocks, and below the largest level at
  most (levels[j-1] - 1) // levels[j] blocks per group (the greedy cut of block_layout)."""
  padded = _buffer_rows(n, num_groups, levels)
  return [padded // size if j == 0 else min(padded // size,
                                            num_groups * ((levels[j - 1] - 1) // size))
          for j, size in enumerate(levels)]


def block_layout(slots: Slots, num_groups: int, levels: tuple[int, ...],
                 computed_groups: int | None = None) -> tuple[Blocks, int]:
  """(blocks, buffer rows): each group's sorted assignments, padded to a whole number of
  the smallest blocks and cut greedily, largest level first, into blocks of the `levels`
  sizes (for the powers of two of `block_levels`, the fewest blocks: a group of 1000 rows
  at 1024/512/256/128 is one block of 1024, not 512 + 256 + 128 + 128, and no group
  pads more than with a cut into the smallest blocks), one region per block size. The
  first `computed_groups` groups' blocks are counted as occupied (all by default; the
  padding group of `grouped_rows` is left out). Each region starts where the one before
  ends for this routing, so the buffer holds n + num_groups * (smallest block - 1) rows:
  the most any routing pads to, where regions at fixed offsets would need room for each
  one's worst case (twice n at 64 experts)."""
  n = slots.order_N.shape[0]
  computed = num_groups if computed_groups is None else computed_groups
  units = _level_units(levels)
  left_E = -(-slots.sizes_E // levels[-1])  # the group's rows in smallest blocks, to cut
  starts = jnp.zeros_like(slots.sizes_E)  # each group's first rank in the current level
  dest = jnp.zeros_like(slots.rank_N)
  block_expert, n_blocks, offsets = [], [], []
  offset = jnp.zeros((), jnp.int32)
  for j, (size, bound) in enumerate(zip(levels, _region_bounds(n, num_groups, levels))):
    count = left_E // units[j]
    left_E = left_E - count * units[j]
    rows = count * size
    ends = jnp.cumsum(rows)
    first = starts[slots.expert_N]
    mine = (slots.rank_N >= first) & (slots.rank_N < first + rows[slots.expert_N])
    dest = jnp.where(mine, offset + (ends - rows)[slots.expert_N] + slots.rank_N - first, dest)
    block_start = jnp.arange(bound, dtype=jnp.int32) * size
    block_expert.append(jnp.minimum(jnp.searchsorted(ends, block_start, side="right"),
                                    computed - 1).astype(jnp.int32))
    n_blocks.append((jnp.sum(count[:computed])).astype(jnp.int32))
    offsets.append(offset)
    offset = offset + (jnp.sum(count) * size).astype(jnp.int32)
    starts = starts + rows
  blocks = Blocks(dest.astype(jnp.int32),
                  BlockLoop(tuple(block_expert), tuple(n_blocks), tuple(offsets)))
  return blocks, _buffer_rows(n, num_groups, levels)


def _rows(a, start, block):
  return jax.lax.dynamic_slice_in_dim(a, start, block)


def _put(a, rows, start):
  return jax.lax.dynamic_update_slice_in_dim(a, rows, start, 0)


def _block_loops(levels: tuple[int, ...], loop: BlockLoop, body, carry):
  """body(first row, block rows, its expert, carry) over each region's occupied blocks,
  region by region (a fori_loop each)."""
  for size, experts, n, offset in zip(levels, *loop):
    carry = jax.lax.fori_loop(
        0, n, lambda b, c, size=size, experts=experts, offset=offset: body(
            offset + b * size, size, experts[b], c), carry)
  return carry


def _add_rows(acc_SxD, src, rows):
  """acc[src[i]] += rows[i]: a block's rows summed into their sources (padding rows, whose
  source is S, one past the end, dropped). Inside the block loop this replaces a
  [rows, D] buffer and a gather-and-sum after it, which on CPU cost more than the serial
  scatter."""
  return acc_SxD.at[src].add(rows, mode="drop")


def _gate_up(w_gate, w_up, e):
  """[D, 2F]: expert e's gate and up projections side by side (sliced per block: one
  copy of the block's expert either way, where a whole [E, D, 2F] concatenation outside
  the loop cost as much again, and its gradient's split a second time)."""
  return jnp.concatenate([w_gate[e], w_up[e]], axis=-1)


def _grouped_fwd(x_SxD, w_R, w_gate, w_up, w_down, src_R, loop, levels):
  s, d = x_SxD.shape

  def body(start, size, e, carry):
    y, gu_buf = carry
    src = _rows(src_R, start, size)
    gu = _get_rows(x_SxD, src) @ _gate_up(w_gate, w_up, e)
    g, u = jnp.split(gu, 2, axis=-1)
    yb = ((jax.nn.silu(g) * u) @ w_down[e]) * _rows(w_R, start, size)[:, None]
    return _add_rows(y, src, yb), _put(gu_buf, gu, start)

  y, gu_RxF2 = _block_loops(levels, loop, body, (
      jnp.zeros((s, d), x_SxD.dtype), jnp.zeros((w_R.shape[0], 2 * w_gate.shape[-1]),
                                                    x_SxD.dtype)))
  return y, gu_RxF2


def _grouped_bwd(x_SxD, w_R, gu_RxF2, dy_SxD, w_gate, w_up, w_down, src_R, loop, levels):
  s, d = x_SxD.shape
  f = w_gate.shape[-1]

  def body(start, size, e, carry):
    dx, dw, dwg, dwu, dwd = carry
    src = _rows(src_R, start, size)
    xb, dy = _get_rows(x_SxD, src), _get_rows(dy_SxD, src)
    g, u = jnp.split(_rows(gu_RxF2, start, size), 2, axis=-1)
    wb = _rows(w_R, start, size)[:, None]
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    h = silu * u
    dh_unweighted = dy @ w_down[e].T
    # d(routing weight) = <dy, h Wd> = <dy Wd^T, h>: no stored expert outputs needed.
    dw = _put(dw, jnp.sum(dh_unweighted * h, axis=-1), start)
    dh = dh_unweighted * wb
    dgu = jnp.concatenate([dh * u * sig * (1 + g * (1 - sig)), dh * silu], axis=-1)
    dwd = dwd.at[e].add(h.T @ (dy * wb))
    dwgu = xb.T @ dgu
    dwg, dwu = dwg.at[e].add(dwgu[:, :f]), dwu.at[e].add(dwgu[:, f:])
    return (_add_rows(dx, src, dgu @ _gate_up(w_gate, w_up, e).T), dw, dwg, dwu, dwd)

  dx, *grads = _block_loops(levels, loop, body, (
      jnp.zeros((s, d), x_SxD.dtype), jnp.zeros_like(w_R), jnp.zeros_like(w_gate),
      jnp.zeros_like(w_up), jnp.zeros_like(w_down)))
  return (dx, *grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def grouped_swiglu(x_SxD, w_R, w_gate, w_up, w_down, src_R, loop: BlockLoop,
                   levels: tuple[int, ...]):
  """[S, D]: source row s gets the sum over the buffer rows r with src_R[r] = s of
  w_R[r] * swiglu_{expert of r's block}(x_SxD[s]), the buffer rows being cut into the
  blocks of the `levels` sizes (block_layout). Each block takes its expert's gate and up
  projections side by side (`_gate_up`), so its input goes through one [D, 2F] matmul (and,
  backwards, one for its input gradient and one for the weights' gradient) instead of
  two half as wide: on CPU, wider products use the cores better. Each block reads its
  input rows from x_SxD (src_R[r] = S for an empty row) and adds its outputs into their
  sources inside the loop, and the backward reads the output gradient and adds the
  input gradient the same way, so no [rows, D] array is ever made. Only each region's
  first loop.n_blocks blocks, from row loop.offsets, are computed. Custom VJP: one fused
  loop backwards."""
  return _grouped_fwd(x_SxD, w_R, w_gate, w_up, w_down, src_R, loop, levels)[0]


def _grouped_vjp_fwd(x, w_r, wg, wu, wd, src_R, loop, levels):
  y, gu = _grouped_fwd(x, w_r, wg, wu, wd, src_R, loop, levels)
  return y, (x, w_r, gu, wg, wu, wd, src_R, loop)


def _grouped_vjp_bwd(levels, res, dy):
  x, w_r, gu, wg, wu, wd, src_R, loop = res
  grads = _grouped_bwd(x, w_r, gu, dy, wg, wu, wd, src_R, loop, levels)
  return (*grads, None, None)


grouped_swiglu.defvjp(_grouped_vjp_fwd, _grouped_vjp_bwd)


def grouped_layout(slots: Slots, weight_N, num_groups: int, k: int, levels, num_sources: int,
                   dtype, computed_groups: int | None = None):
  """(w_R, src_R, loop): the arguments of `grouped_swiglu` for the sorted assignments of
  num_sources sources (k each) cut into blocks of the `levels` sizes (block_layout)."""
  blocks, rows = block_layout(slots, num_groups, levels, computed_groups)
  layout = Layout(slots.order_N, blocks.dest_N, weight_N, rows, k)
  src_R = _sources(_assignments(layout), k, num_sources)
  w_R = jnp.zeros((rows,), dtype).at[blocks.dest_N].set(weight_N.astype(dtype))
  return w_R, src_R, blocks.loop


def _grouped(x_SxD, slots: Slots, weight_N, num_groups: int, k: int, levels, w_gate, w_up,
             w_down, computed_groups: int | None = None):
  """The sorted assignments of S sources (k each) through `grouped_swiglu`."""
  w_R, src_R, loop = grouped_layout(slots, weight_N, num_groups, k, levels, x_SxD.shape[0],
                                    x_SxD.dtype, computed_groups)
  return grouped_swiglu(x_SxD, w_R, w_gate, w_up, w_down, src_R, loop, levels)


def dropless(x_TxD, routing, w_gate, w_up, w_down, cfg, max_block: int = MAX_BLOCK):
  """No token dropped: assignments sorted by expert, each expert's group cut into blocks
  of decreasing size (block_levels), through `grouped_swiglu`, which applies the routing
  weights and sums each token's assignments itself."""
  t, k = routing.experts_TxK.shape
  e = cfg.num_experts
  slots = sort_slots(routing, e)
  weight_N = routing.weights_TxK.reshape(-1)[slots.order_N]
  y = _grouped(x_TxD, slots, weight_N, e, k, block_levels(t * k, e, max_block), w_gate, w_up,
               w_down)
  return y, jnp.float32(0.0)


def capacity_grouped(x_TxD, routing, w_gate, w_up, w_down, cfg, max_block: int = MAX_BLOCK):
  """Capacity semantics (the assignments beyond an expert's C slots dropped, as
  capacity_layout drops them) on dropless's block loop: each expert's kept assignments
  are its group, the dropped ones a padding group E that is laid out but never
  computed, so an expert with fewer than C assignments costs only its own rows."""
  t, k = routing.experts_TxK.shape
  e = cfg.num_experts
  slots, keep, c = _capacity_slots(routing, cfg)
  dropped_rank = jnp.cumsum(~keep, dtype=jnp.int32) - 1  # rank within the padding group
  kept_E = jnp.minimum(slots.sizes_E, c)
  grouped = Slots(slots.order_N, jnp.where(keep, slots.expert_N, e),
                  jnp.where(keep, slots.rank_N, dropped_rank),
                  jnp.concatenate([kept_E, jnp.sum(slots.sizes_E - kept_E, keepdims=True)]))
  weight_N = routing.weights_TxK.reshape(-1)[slots.order_N] * keep
  y = _grouped(x_TxD, grouped, weight_N, e + 1, k, block_levels(min(t * k, e * c), e, max_block),
               w_gate, w_up, w_down, computed_groups=e)
  return y, 1.0 - keep.mean()


def capacity_dispatch(x_TxD, routing, w_gate, w_up, w_down, cfg):
  """The `capacity` backend: `capacity_grouped` on CPU (a batched matmul of [E, C, D]
  spreads poorly over CPU cores at fine granularity), `capacity_gather` on GPU/TPU
  (static shapes), resolved when traced. Both give the same outputs and gradients."""
  fn = capacity_grouped if jax.default_backend() == "cpu" else capacity_gather
  return fn(x_TxD, routing, w_gate, w_up, w_down, cfg)


def grouped_rows(x_MxD, expert_M, w_gate, w_up, w_down, backend: str, rows_hint: int):
  """[M, D]: row m through expert expert_M[m] (unweighted); rows with expert_M == E (one
  past the last expert) are padding, never computed, and come back zero. The local expert
  step of expert parallelism: `grouped_swiglu` for every dropless backend, the Pallas
  grouped matmul for `pallas`. `rows_hint` (the real rows expected) sets the block sizes."""
  m, e = x_MxD.shape[0], w_gate.shape[0]
  if resolve_backend(backend) == "pallas":
    from moe_jax.moe import pallas_backend  # pylint: disable=g-import-not-at-top
    return pallas_backend.grouped_rows(x_MxD, expert_M, w_gate, w_up, w_down)
  routing = Routing(jnp.ones((m, 1), x_MxD.dtype), expert_M[:, None], None)
  slots = sort_slots(routing, e + 1)  # the padding is the last group, never computed
  return _grouped(x_MxD, slots, routing.weights_TxK[:, 0], e + 1, 1,
                  block_levels(rows_hint, e), w_gate, w_up, w_down, computed_groups=e)


def ragged(x_TxD, routing, w_gate, w_up, w_down, cfg):
  """Dropless with `jax.lax.ragged_dot` on the expert-sorted assignments."""
  t, d = x_TxD.shape
  k = routing.experts_TxK.shape[1]
  slots = sort_slots(routing, cfg.num_experts)
  token = slots.order_N // k
  y = layers.swiglu(x_TxD[token], w_gate, w_up, w_down,
                    lambda a, w: jax.lax.ragged_dot(a, w, slots.sizes_E))
  w = routing.weights_TxK.reshape(-1)[slots.order_N].astype(y.dtype)
  return jnp.zeros((t, d), y.dtype).at[token].add(y * w[:, None]), jnp.float32(0.0)


def _pallas(*args):  # lazy import: pallas_backend pulls in the Pallas kernels
  from moe_jax.moe import pallas_backend  # pylint: disable=g-import-not-at-top
  return pallas_backend.pallas(*args)


def resolve_backend(name: str) -> str:
  """'auto' -> 'pallas' on GPU/TPU, 'dropless' on CPU (jax.default_backend() at trace time)."""
  if name != "auto":
    return name
  return "pallas" if jax.default_backend() in ("gpu", "tpu") else "dropless"


BACKENDS = {"capacity": capacity_dispatch, "capacity_gather": capacity_gather,
            "capacity_grouped": capacity_grouped, "capacity_einsum": capacity_einsum,
            "dropless": dropless, "ragged": ragged, "pallas": _pallas,
            "auto": lambda *args: BACKENDS[resolve_backend("auto")](*args)}
# The backends that drop assignments beyond C = capacity(T, cfg) slots per expert.
CAPACITY_BACKENDS = ("capacity", "capacity_gather", "capacity_grouped", "capacity_einsum")
