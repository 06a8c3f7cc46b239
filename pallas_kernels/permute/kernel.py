"""Row gather-combine kernel: out[r] = sum_k w[r, k] * x[idx[r, k]] (float32 accumulation).

With K = 1 and unit weights it is the permutation into expert order; with the K rows of
each token it is the weighted combine back. Triton: one program per (row, column tile),
rows of x read at dynamic offsets with masked loads. Mosaic: the row indices are
scalar-prefetched into SMEM and drive the x BlockSpec; K is a reduction grid axis into a
float32 VMEM accumulator. Indices and weights live in SMEM there, which bounds R * K to
what SMEM holds (two 32-bit words each).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.target import Target, compiler_params, next_pow2


def _triton_kernel(idx_ref, w_ref, x_ref, out_ref, *, k, d, bd):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  r, d0 = pl.program_id(0), pl.program_id(1) * bd
  cols = d0 + jnp.arange(bd)
  mask = cols < d
  acc = jnp.zeros((bd,), jnp.float32)
  for j in range(k):
    row = x_ref.at[idx_ref[r * k + j], pl.ds(d0, bd)]
    acc += w_ref[r * k + j] * plgpu.load(row, mask=mask, other=0).astype(jnp.float32)
  plgpu.store(out_ref.at[r, pl.ds(d0, bd)], acc.astype(out_ref.dtype), mask=mask)


def _triton(target, x_TxD, idx_N, w_N, r, k, block_d):
  d = x_TxD.shape[1]
  bd = block_d or min(512, next_pow2(d))
  return pl.pallas_call(
      functools.partial(_triton_kernel, k=k, d=d, bd=bd),
      out_shape=jax.ShapeDtypeStruct((r, d), x_TxD.dtype),
      grid=(r, pl.cdiv(d, bd)),
      compiler_params=compiler_params(target, (), num_warps=1),
      interpret=target.interpret,
      name="gather_combine",
  )(idx_N, w_N, x_TxD)


def _mosaic_kernel(idx_ref, w_ref, x_ref, out_ref, acc_ref, *, k):
  r, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += w_ref[r * k + j] * x_ref[...].astype(jnp.float32)

  @pl.when(j == k - 1)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _mosaic(target, x_TxD, idx_N, w_N, r, k):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  t, d = x_TxD.shape
  row = lambda index_map: pl.BlockSpec((None, 1, d), index_map)
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(r, k),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM),
                row(lambda i, j, idx: (idx[i * k + j], 0, 0))],
      out_specs=row(lambda i, j, idx: (i, 0, 0)),
      scratch_shapes=[pltpu.VMEM((1, d), jnp.float32)])
  out = pl.pallas_call(
      functools.partial(_mosaic_kernel, k=k),
      out_shape=jax.ShapeDtypeStruct((r, 1, d), x_TxD.dtype),
      grid_spec=spec,
      compiler_params=compiler_params(target, ("parallel", "arbitrary")),
      interpret=target.interpret,
      name="gather_combine",
  )(idx_N, w_N, x_TxD.reshape(t, 1, d))
  return out.reshape(r, d)


def gather_combine(target: Target, x_TxD, idx_RxK, w_RxK, *, block_d: int | None = None):
  """out_RxD[r] = sum_k w_RxK[r, k] * x_TxD[idx_RxK[r, k]], in x's dtype."""
  r, k = idx_RxK.shape
  idx_N = idx_RxK.reshape(-1).astype(jnp.int32)
  w_N = w_RxK.reshape(-1).astype(jnp.float32)
  if target.variant == "mosaic":
    return _mosaic(target, x_TxD, idx_N, w_N, r, k)
  return _triton(target, x_TxD, idx_N, w_N, r, k, block_d)
