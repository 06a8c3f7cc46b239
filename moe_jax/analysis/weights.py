"""Matrix-level cosine similarity between experts (and the dense FFN they came from).

Every function works on numpy arrays (or anything np.asarray accepts, e.g. ExpertStack),
accumulates in float64, and gives cosine 0 (not NaN) wherever a vector is all zeros.
"""
from __future__ import annotations

import numpy as np

_BLOCK_BYTES = 1 << 19  # float64 bytes per block when accumulating a Gram matrix


def gram(x_NxP: np.ndarray, chunk: int | None = None) -> np.ndarray:
  """[N, N] float64 inner products of the rows, in blocks of `chunk` columns (by default
  512 KiB: small blocks are reused by the allocator, large ones mapped afresh)."""
  x_NxP = np.asarray(x_NxP)
  chunk = chunk or max(1, _BLOCK_BYTES // (8 * max(x_NxP.shape[0], 1)))
  g_NxN = np.zeros((x_NxP.shape[0],) * 2, np.float64)
  for s in range(0, x_NxP.shape[1], chunk):
    block = x_NxP[:, s:s + chunk].astype(np.float64)
    g_NxN += block @ block.T
  return g_NxN


def cosine_from_gram(g_NxN: np.ndarray) -> np.ndarray:
  """Cosine matrix from a Gram matrix; rows of norm 0 get cosine 0 with everything."""
  norm_N = np.sqrt(np.clip(np.diag(g_NxN), 0.0, None))
  outer_NxN = np.outer(norm_N, norm_N)
  safe = np.where(outer_NxN > 0, outer_NxN, 1.0)
  return np.where(outer_NxN > 0, np.clip(g_NxN / safe, -1.0, 1.0), 0.0)


def row_cosine(x_NxP: np.ndarray) -> np.ndarray:
  """[N, N] cosine between the rows of a matrix."""
  return cosine_from_gram(gram(x_NxP))


def _unit_rows(x_NxP: np.ndarray, dtype) -> np.ndarray:
  """A `dtype` copy of the rows scaled to norm 1 (norms in float64; zero rows stay 0)."""
  x = np.array(x_NxP, dtype)
  norm_N = np.sqrt(np.einsum("np,np->n", x, x, dtype=np.float64))
  x /= np.where(norm_N > 0, norm_N, 1.0).astype(dtype)[:, None]
  return x


def cross_cosine(a_NxP: np.ndarray, b_MxP: np.ndarray, dtype=np.float64) -> np.ndarray:
  """[N, M] cosine between the rows of a and the rows of b (zero rows give 0), computed
  in `dtype`: float32 halves the memory of the large neuron-by-neuron matrices."""
  out = _unit_rows(a_NxP, dtype) @ _unit_rows(b_MxP, dtype).T
  return np.clip(out, -1.0, 1.0, out=out)


def flat_cosine(mats_NxP: np.ndarray) -> np.ndarray:
  """[N, N] cosine between N matrices (any trailing shape), each flattened to one vector."""
  mats_NxP = np.asarray(mats_NxP)
  return row_cosine(mats_NxP.reshape(mats_NxP.shape[0], -1))


def with_reference(w_ExAxB: np.ndarray, reference_AxB: np.ndarray | None) -> np.ndarray:
  """The expert stack with the reference matrix appended as the last entry (if given)."""
  w_ExAxB = np.asarray(w_ExAxB)
  if reference_AxB is None:
    return w_ExAxB
  reference_AxB = np.asarray(reference_AxB)
  if reference_AxB.shape != w_ExAxB.shape[1:]:
    raise ValueError(f"reference shape {reference_AxB.shape} != expert shape {w_ExAxB.shape[1:]}"
                     " (pass the matching shard for sharded experts)")
  return np.concatenate([w_ExAxB, reference_AxB[None].astype(w_ExAxB.dtype)])


def weight_cosine(w_ExAxB: np.ndarray, reference_AxB: np.ndarray | None = None) -> np.ndarray:
  """[E, E] (or [E+1, E+1] with the reference LAST) cosine between flattened expert matrices.

  The reference is the dense FFN matrix the experts came from, or, for virtual-group or
  partition experts, the matching shard of it (same shape as one expert)."""
  return flat_cosine(with_reference(w_ExAxB, reference_AxB))


def off_diagonal_mean(cos_NxN: np.ndarray) -> float:
  """Mean over the pairs i < j (the summary number papers report per layer)."""
  iu = np.triu_indices(cos_NxN.shape[0], 1)
  return float(np.mean(cos_NxN[iu])) if iu[0].size else float("nan")
