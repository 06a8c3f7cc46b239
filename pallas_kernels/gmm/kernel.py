"""Grouped matmuls over expert-sorted rows: gmm (per-group lhs @ rhs[g]) and tgmm
(per-group lhs^T @ dout, the weight gradient).

Triton (GPU): a tile of `bm` rows may span groups, so the (row tile, group) pairs are
listed outside the kernel (`tile_map`, as megablox does) and each program computes one
pair, loading and storing only its group's rows (row masks); a tile spanning two groups
is visited twice, each visit writing disjoint rows. tgmm runs one program per (group,
K tile, N tile) looping over the group's row tiles. Mosaic (TPU): megablox gmm/tgmm.
"""
from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.target import Target, compiler_params, next_pow2


def _megablox():
  """megablox's gmm module (its package re-exports the op `gmm` under the module's name)."""
  import jax.experimental.pallas.ops.tpu.megablox  # pylint: disable=g-import-not-at-top
  return sys.modules["jax.experimental.pallas.ops.tpu.megablox.gmm"]


def default_tiling(target: Target, m: int, k: int, n: int) -> tuple[int, int, int]:
  """(bm, bk, bn). Triton: powers of two in [16, 64]. Mosaic: 128 rows, whole K/N up to 512."""
  if target.variant == "mosaic":
    return 128, (k if k <= 512 else 512), (n if n <= 512 else 512)
  clamp = lambda v: max(16, min(64, next_pow2(v)))
  return clamp(m), clamp(k), clamp(n)


class TileMap(NamedTuple):
  group_P: jax.Array   # group of each (row tile, group) pair; -1 past the last pair
  tile_P: jax.Array    # row tile of each pair
  starts_G: jax.Array  # first row of each group
  ends_G: jax.Array    # one past the last row of each group


def tile_map(group_sizes_G, m: int, bm: int) -> TileMap:
  """Every (row tile, group) pair with rows of that group, in row order (static length
  cdiv(m, bm) + G - 1, padded with group -1)."""
  g = group_sizes_G.shape[0]
  ends = jnp.cumsum(group_sizes_G).astype(jnp.int32)
  starts = ends - group_sizes_G
  first = starts // bm
  n_tiles = jnp.where(group_sizes_G > 0, (ends - 1) // bm - first + 1, 0)
  cum = jnp.cumsum(n_tiles)
  p = jnp.arange(pl.cdiv(m, bm) + g - 1, dtype=jnp.int32)
  grp = jnp.minimum(jnp.searchsorted(cum, p, side="right"), g - 1).astype(jnp.int32)
  tile = first[grp] + p - (cum[grp] - n_tiles[grp])
  valid = p < cum[-1]
  return TileMap(jnp.where(valid, grp, -1), jnp.where(valid, tile, 0).astype(jnp.int32),
                 starts.astype(jnp.int32), ends)


def _gmm_kernel(group_ref, tile_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *,
                bm, bk, bn, k, n, transpose_rhs):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  p, n0 = pl.program_id(0), pl.program_id(1) * bn
  g = group_ref[p]

  @pl.when(g >= 0)
  def _visit():
    r0 = tile_ref[p] * bm
    rows = r0 + jnp.arange(bm)
    rmask = (rows >= starts_ref[g]) & (rows < ends_ref[g])
    cmask = (n0 + jnp.arange(bn)) < n

    def body(i, acc):
      kmask = (i * bk + jnp.arange(bk)) < k
      a = plgpu.load(lhs_ref.at[pl.ds(r0, bm), pl.ds(i * bk, bk)],
                     mask=rmask[:, None] & kmask[None, :], other=0)
      if transpose_rhs:  # rhs is [G, N, K]
        b = plgpu.load(rhs_ref.at[g, pl.ds(n0, bn), pl.ds(i * bk, bk)],
                       mask=cmask[:, None] & kmask[None, :], other=0)
        dims = (((1,), (1,)), ((), ()))
      else:
        b = plgpu.load(rhs_ref.at[g, pl.ds(i * bk, bk), pl.ds(n0, bn)],
                       mask=kmask[:, None] & cmask[None, :], other=0)
        dims = (((1,), (0,)), ((), ()))
      return acc + lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, pl.cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(out_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], acc.astype(out_ref.dtype),
                mask=rmask[:, None] & cmask[None, :])


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, bm, bk, bn, k, n):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  g, k0, n0 = pl.program_id(0), pl.program_id(1) * bk, pl.program_id(2) * bn
  start, end = starts_ref[g], ends_ref[g]
  kmask = (k0 + jnp.arange(bk)) < k
  cmask = (n0 + jnp.arange(bn)) < n

  def body(t, acc):
    rows = t * bm + jnp.arange(bm)
    rmask = (rows >= start) & (rows < end)
    a = plgpu.load(lhs_ref.at[pl.ds(t * bm, bm), pl.ds(k0, bk)],
                   mask=rmask[:, None] & kmask[None, :], other=0)
    b = plgpu.load(dout_ref.at[pl.ds(t * bm, bm), pl.ds(n0, bn)],
                   mask=rmask[:, None] & cmask[None, :], other=0)
    return acc + lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  last = jnp.where(end > start, (end + bm - 1) // bm, start // bm)
  acc = lax.fori_loop(start // bm, last, body, jnp.zeros((bk, bn), jnp.float32))
  plgpu.store(out_ref.at[g, pl.ds(k0, bk), pl.ds(n0, bn)], acc.astype(out_ref.dtype),
              mask=kmask[:, None] & cmask[None, :])


def _triton_tiling(target, tiling, m, k, n) -> tuple[int, int, int, int, int]:
  """(bm, bk, bn, num_warps, num_stages): a Triton tiling may name the last two."""
  tiling = tuple(tiling or default_tiling(target, m, k, n))
  if len(tiling) not in (3, 5):
    raise ValueError(f"tiling={tiling}: expected (bm, bk, bn) or (bm, bk, bn, num_warps, "
                     "num_stages)")
  return tiling + (4, 1)[len(tiling) - 3:]


def _triton_gmm(target, lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs):
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bk, bn, warps, stages = _triton_tiling(target, tiling, m, k, n)
  tm = tile_map(group_sizes, m, bm)
  kernel = functools.partial(_gmm_kernel, bm=bm, bk=bk, bn=bn, k=k, n=n,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(tm.group_P.shape[0], pl.cdiv(n, bn)),
      compiler_params=compiler_params(target, (), warps, stages), interpret=target.interpret,
      name="gmm",
  )(*tm, lhs, rhs)


def _triton_tgmm(target, lhs, dout, group_sizes, out_dtype, tiling):
  (m, k), n, g = lhs.shape, dout.shape[1], group_sizes.shape[0]
  bm, bk, bn, warps, stages = _triton_tiling(target, tiling, m, k, n)
  tm = tile_map(group_sizes, m, bm)
  kernel = functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn, k=k, n=n)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
      grid=(g, pl.cdiv(k, bk), pl.cdiv(n, bn)),
      compiler_params=compiler_params(target, (), warps, stages), interpret=target.interpret,
      name="tgmm",
  )(tm.starts_G, tm.ends_G, lhs, dout)


def _pad_rows(a, bm):
  return jnp.pad(a, ((0, -a.shape[0] % bm), (0, 0)))


def gmm(target: Target, lhs_MxK, rhs_GxKxN, group_sizes_G, *, transpose_rhs: bool = False,
        out_dtype=None, tiling: tuple[int, int, int] | None = None):
  """out[rows of group g] = lhs[rows of group g] @ rhs[g] (rhs[g].T if transpose_rhs).
  The groups tile rows [0, sum(group_sizes)); rows past them are unspecified. tiling:
  (bm, bk, bn), or on Triton (bm, bk, bn, num_warps, num_stages); None: default_tiling."""
  out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  if target.variant == "triton":
    return _triton_gmm(target, lhs_MxK, rhs_GxKxN, group_sizes_G, out_dtype, tiling,
                       transpose_rhs)
  m, k = lhs_MxK.shape
  n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
  tiling = tuple(tiling or default_tiling(target, m, k, n))[:3]
  out = _megablox().gmm(_pad_rows(lhs_MxK, tiling[0]), rhs_GxKxN, group_sizes_G, out_dtype,
                        tiling, transpose_rhs=transpose_rhs, interpret=target.interpret)
  return out[:m]


def tgmm(target: Target, lhs_MxK, dout_MxN, group_sizes_G, *, out_dtype=None,
         tiling: tuple[int, int, int] | None = None):
  """out[g] = lhs[rows of g].T @ dout[rows of g], shape [G, K, N]; zero for empty groups."""
  out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  if target.variant == "triton":
    return _triton_tgmm(target, lhs_MxK, dout_MxN, group_sizes_G, out_dtype, tiling)
  (m, k), n = lhs_MxK.shape, dout_MxN.shape[1]
  tiling = tuple(tiling or default_tiling(target, m, k, n))[:3]
  return _megablox().tgmm(_pad_rows(lhs_MxK, tiling[0]).T, _pad_rows(dout_MxN, tiling[0]),
                          group_sizes_G, out_dtype, tiling,
                          num_actual_groups=group_sizes_G.shape[0], interpret=target.interpret)
