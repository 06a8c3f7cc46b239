"""2-D PCA of experts (one point per flattened matrix) or of their neurons (one per neuron)."""
from __future__ import annotations

import numpy as np
from scipy import linalg
from scipy.linalg import blas

from moe_jax.analysis import neurons, weights


_ROWS = 1024  # rows per block of the covariance and the projection
_COLS = 1 << 16  # columns per block of the right singular vectors and the projection


def _centred_rows(points_NxP: np.ndarray, mean_P: np.ndarray):
  """(row slice, float64 centred block) over blocks of _ROWS rows."""
  for start in range(0, points_NxP.shape[0], _ROWS):
    rows = slice(start, start + _ROWS)
    block = np.array(points_NxP[rows], np.float64)
    block -= mean_P
    yield rows, block


def _centred_cols(points_NxP: np.ndarray, mean_P: np.ndarray):
  """(column slice, float64 centred block) over blocks of _COLS columns."""
  for start in range(0, points_NxP.shape[1], _COLS):
    cols = slice(start, start + _COLS)
    block = np.array(points_NxP[:, cols], np.float64)
    block -= mean_P[cols]
    yield cols, block


def _points(points_NxP):
  """An array, or neurons.NeuronRows as it is (read in row blocks, never whole)."""
  return points_NxP if isinstance(points_NxP, neurons.NeuronRows) else np.asarray(points_NxP)


def _mean_rows(points_NxP) -> np.ndarray:
  total_P = np.zeros(points_NxP.shape[1])
  for start in range(0, points_NxP.shape[0], _ROWS):
    total_P += np.sum(points_NxP[start:start + _ROWS], axis=0, dtype=np.float64)
  return total_P / max(points_NxP.shape[0], 1)


def _spectrum(points_NxP, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """(mean_P, top-k singular values, their right singular vectors as rows, total variance)
  of the centred points, without an N x P float64 copy: from the N x N centred Gram matrix
  when N <= P (few points, e.g. experts, accumulated in column blocks), else from the
  P x P covariance (many points, e.g. neurons): its upper triangle accumulated in place
  in row blocks (BLAS syrk), then only its top k eigenpairs (LAPACK evr)."""
  n, p = points_NxP.shape
  if n <= p:  # few points: the whole array (small next to P x P)
    points_NxP = np.asarray(points_NxP)
  mean_P = _mean_rows(points_NxP)
  if n <= p:  # X_c X_c^T = H X X^T H, H the centring matrix; v_i = X_c^T u_i / s_i
    h_NxN, g_NxN = np.eye(n) - 1.0 / n, weights.gram(points_NxP)
    eig, u_NxN = np.linalg.eigh(h_NxN @ g_NxN @ h_NxN)
    eig[eig <= n * np.finfo(np.float64).eps * np.trace(g_NxN)] = 0.0  # rounding, not variance
    order = np.argsort(eig)[::-1][:k]
    s, u_NxK = np.sqrt(np.clip(eig[order], 0.0, None)), u_NxN[:, order]
    vt_KxP = np.zeros((u_NxK.shape[1], p))
    for cols, block in _centred_cols(points_NxP, mean_P):
      vt_KxP[:, cols] = u_NxK.T @ block
    vt_KxP /= np.where(s > 0, s, 1.0)[:, None]
    return mean_P, s, vt_KxP, float(np.clip(eig, 0.0, None).sum())
  cov_PxP = np.zeros((p, p), order="F")  # upper triangle only, as syrk writes it
  for _, block in _centred_rows(points_NxP, mean_P):
    cov_PxP = blas.dsyrk(1.0, block.T, beta=1.0, c=cov_PxP, overwrite_c=True)
  total = float(np.trace(cov_PxP))
  eig, vecs_PxK = linalg.eigh(cov_PxP, lower=False, subset_by_index=[max(p - k, 0), p - 1],
                              driver="evr", overwrite_a=True, check_finite=False)
  order = np.argsort(eig)[::-1]
  return mean_P, np.sqrt(np.clip(eig[order], 0.0, None)), vecs_PxK[:, order].T, total


def principal_axes(points_NxP: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean_P, axes_kxP, explained_variance_ratio_k) of the centred points.

  Sign convention: each axis's largest-|value| entry is positive, so results are
  deterministic. Missing axes (rank < k) are zero with ratio 0."""
  points_NxP = _points(points_NxP)
  mean_P, s_k, vt, total = _spectrum(points_NxP, k)
  tol = (s_k.max() if s_k.size else 0.0) * max(points_NxP.shape) * np.finfo(np.float64).eps
  m = min(k, int(np.count_nonzero(s_k > tol)))  # the numerical rank, as np.linalg.matrix_rank
  axes_kxP = np.zeros((k, points_NxP.shape[1]))
  axes_kxP[:m] = vt[:m]
  big_k = np.argmax(np.abs(axes_kxP), axis=1)
  axes_kxP *= np.where(axes_kxP[np.arange(k), big_k] < 0, -1.0, 1.0)[:, None]
  ratio_k = np.zeros(k)
  if total > 0:
    ratio_k[:m] = s_k[:m] ** 2 / total
  return mean_P, axes_kxP, ratio_k


def pca_2d(points_NxP: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(coords_Nx2, explained_variance_ratio_2): the points projected on the top two axes."""
  points_NxP = _points(points_NxP)
  mean_P, axes_2xP, ratio_2 = principal_axes(points_NxP, 2)
  n, p = points_NxP.shape
  coords_Nx2 = np.zeros((n, 2))
  if n > p:  # many points: in row blocks (no N x P float64 copy either way)
    for rows, block in _centred_rows(points_NxP, mean_P):
      coords_Nx2[rows] = block @ axes_2xP.T
  else:  # few long points: in column blocks
    for cols, block in _centred_cols(np.asarray(points_NxP), mean_P):
      coords_Nx2 += block @ axes_2xP[:, cols].T
  return coords_Nx2, ratio_2


def expert_points(w_ExAxB: np.ndarray, reference_AxB: np.ndarray | None = None) -> np.ndarray:
  """[E (+1), A*B]: one point per expert matrix, the reference (dense FFN) LAST if given."""
  stack = weights.with_reference(w_ExAxB, reference_AxB)
  return stack.reshape(stack.shape[0], -1)


def neuron_points(neurons_ExFxP: np.ndarray,
                  reference_FxP: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """([E*F (+F), P] points, [E*F (+F)] expert labels): all neurons stacked, expert-major.

  The reference's neurons (if given) come last with label E. Build neurons_ExFxP with
  neurons.neuron_vectors (one matrix kind) or neurons.expert_neurons (gate|up|down); the
  latter without a reference gives its rows lazily (neurons.NeuronRows)."""
  if isinstance(neurons_ExFxP, neurons.ExpertNeurons) and reference_FxP is None:
    e, f = neurons_ExFxP.shape[:2]
    return neurons_ExFxP.rows(), np.repeat(np.arange(e), f)
  stack = np.asarray(neurons_ExFxP)
  if reference_FxP is not None:
    stack = np.concatenate([stack, np.asarray(reference_FxP, stack.dtype)[None]])
  e, f = stack.shape[:2]
  return stack.reshape(e * f, -1), np.repeat(np.arange(e), f)


def expert_neuron_points(w_ExAxB: np.ndarray, neuron_axis: int) -> tuple[np.ndarray, np.ndarray]:
  """neuron_points of one stacked matrix kind (neuron_axis -1 for gate/up, 1 for down)."""
  return neuron_points(neurons.neuron_vectors(w_ExAxB, neuron_axis))
