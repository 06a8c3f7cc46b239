"""Permute tokens into expert-sorted order and unpermute with the weighted combine.

`plan` (plain jnp) turns expert ids and counts into the expert-sorted order with group
offsets; `permute` and `unpermute` move the rows with the gather-combine kernel and own
their custom VJPs (each one's input gradient is the other's data movement).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import target as target_lib
from pallas_kernels.permute import kernel


class Plan(NamedTuple):
  order_M: jax.Array        # assignment (t * K + k) at each expert-sorted row, M = T * K
  row_TxK: jax.Array        # expert-sorted row of each assignment
  group_sizes_E: jax.Array  # rows per expert
  group_offsets_E: jax.Array  # first row of each expert's group


def plan(experts_TxK, num_experts: int, counts_E=None) -> Plan:
  """Stable sort of the assignments by expert (ties keep token order)."""
  experts_N = experts_TxK.reshape(-1)
  n = experts_N.shape[0]
  order = jnp.argsort(experts_N, stable=True).astype(jnp.int32)
  row = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  sizes = (jnp.zeros((num_experts,), jnp.int32).at[experts_N].add(1) if counts_E is None
           else counts_E.astype(jnp.int32))
  return Plan(order, row.reshape(experts_TxK.shape), sizes, jnp.cumsum(sizes) - sizes)


def _gather(target, x, idx, w):
  return target_lib.dispatch(kernel.gather_combine, target, x, idx, w)


def permute(x_TxD, p: Plan, target=None):
  """xs_MxD[r] = x_TxD[token of row r]."""
  return _permute(x_TxD, p.order_M, p.row_TxK, target)


def unpermute(ys_MxD, weights_TxK, p: Plan, target=None):
  """out_TxD[t] = sum_k weights_TxK[t, k] * ys_MxD[row of (t, k)]."""
  return _unpermute(ys_MxD, weights_TxK, p.order_M, p.row_TxK, target)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute(x_TxD, order_M, row_TxK, target):
  k = row_TxK.shape[1]
  return _gather(target, x_TxD, (order_M // k)[:, None], jnp.ones((order_M.shape[0], 1)))


def _permute_fwd(x_TxD, order_M, row_TxK, target):
  return _permute(x_TxD, order_M, row_TxK, target), (order_M, row_TxK)


def _permute_bwd(target, res, dxs_MxD):
  order_M, row_TxK = res
  dx = _gather(target, dxs_MxD, row_TxK, jnp.ones(row_TxK.shape))
  return dx, None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _unpermute(ys_MxD, weights_TxK, order_M, row_TxK, target):
  return _gather(target, ys_MxD, row_TxK, weights_TxK)


def _unpermute_fwd(ys_MxD, weights_TxK, order_M, row_TxK, target):
  out = _unpermute(ys_MxD, weights_TxK, order_M, row_TxK, target)
  return out, (ys_MxD, weights_TxK, order_M, row_TxK)


def _unpermute_bwd(target, res, dout_TxD):
  ys_MxD, weights_TxK, order_M, row_TxK = res
  k = row_TxK.shape[1]
  w_sorted = weights_TxK.reshape(-1)[order_M]
  dys = _gather(target, dout_TxD, (order_M // k)[:, None], w_sorted[:, None])
  dw = jnp.einsum("tkd,td->tk", ys_MxD[row_TxK].astype(jnp.float32),
                  dout_TxD.astype(jnp.float32))
  return dys, dw.astype(weights_TxK.dtype), None, None


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)
