"""Grouped matmul op with its custom VJP: d lhs = gmm(dout, rhs^T), d rhs = tgmm(lhs, dout)."""
from __future__ import annotations

import functools

import jax

from pallas_kernels import target as target_lib
from pallas_kernels.gmm import kernel


def _gmm(target, lhs, rhs, group_sizes, transpose_rhs, tiling, out_dtype):
  fn = functools.partial(kernel.gmm, transpose_rhs=transpose_rhs, tiling=tiling,
                         out_dtype=out_dtype)
  return target_lib.dispatch(fn, target, lhs, rhs, group_sizes)


def _tgmm(target, lhs, dout, group_sizes, tiling, out_dtype):
  fn = functools.partial(kernel.tgmm, tiling=tiling, out_dtype=out_dtype)
  return target_lib.dispatch(fn, target, lhs, dout, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, target=None, tiling=None):
  """out_MxN[rows of group g] = lhs_MxK[rows of group g] @ rhs_GxKxN[g]; the groups
  (sizes summing to M) are consecutive row ranges. `target=None`: by lowering platform."""
  return _gmm(target, lhs_MxK, rhs_GxKxN, group_sizes_G, False, tiling, lhs_MxK.dtype)


def _fwd(lhs, rhs, group_sizes, target, tiling):
  return gmm(lhs, rhs, group_sizes, target, tiling), (lhs, rhs, group_sizes)


def _bwd(target, tiling, res, dout):
  lhs, rhs, group_sizes = res
  dlhs = _gmm(target, dout, rhs, group_sizes, True, tiling, lhs.dtype)
  drhs = _tgmm(target, lhs, dout, group_sizes, tiling, rhs.dtype)
  return dlhs, drhs, None


gmm.defvjp(_fwd, _bwd)
