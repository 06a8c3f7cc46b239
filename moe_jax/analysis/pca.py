"""2-D PCA of experts (one point per flattened matrix) or of their neurons (one per neuron)."""
from __future__ import annotations

import numpy as np

from moe_jax.analysis import neurons, weights


def principal_axes(points_NxP: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean_P, axes_kxP, explained_variance_ratio_k) by SVD of the centred points.

  Sign convention: each axis's largest-|value| entry is positive, so results are
  deterministic. Missing axes (rank < k) are zero with ratio 0."""
  x_NxP = np.asarray(points_NxP, np.float64)
  mean_P = x_NxP.mean(axis=0)
  _, s, vt = np.linalg.svd(x_NxP - mean_P, full_matrices=False)
  tol = (s.max() if s.size else 0.0) * max(x_NxP.shape) * np.finfo(np.float64).eps
  m = min(k, int(np.count_nonzero(s > tol)))  # the numerical rank, as np.linalg.matrix_rank
  axes_kxP = np.zeros((k, x_NxP.shape[1]))
  axes_kxP[:m] = vt[:m]
  big_k = np.argmax(np.abs(axes_kxP), axis=1)
  axes_kxP *= np.where(axes_kxP[np.arange(k), big_k] < 0, -1.0, 1.0)[:, None]
  var = s ** 2
  ratio_k = np.zeros(k)
  if var.sum() > 0:
    ratio_k[:m] = var[:m] / var.sum()
  return mean_P, axes_kxP, ratio_k


def pca_2d(points_NxP: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(coords_Nx2, explained_variance_ratio_2): the points projected on the top two axes."""
  mean_P, axes_2xP, ratio_2 = principal_axes(points_NxP, 2)
  return (np.asarray(points_NxP, np.float64) - mean_P) @ axes_2xP.T, ratio_2


def expert_points(w_ExAxB: np.ndarray, reference_AxB: np.ndarray | None = None) -> np.ndarray:
  """[E (+1), A*B]: one point per expert matrix, the reference (dense FFN) LAST if given."""
  stack = weights.with_reference(w_ExAxB, reference_AxB)
  return stack.reshape(stack.shape[0], -1)


def neuron_points(neurons_ExFxP: np.ndarray,
                  reference_FxP: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """([E*F (+F), P] points, [E*F (+F)] expert labels): all neurons stacked, expert-major.

  The reference's neurons (if given) come last with label E. Build neurons_ExFxP with
  neurons.neuron_vectors (one matrix kind) or neurons.expert_neurons (gate|up|down)."""
  stack = np.asarray(neurons_ExFxP)
  if reference_FxP is not None:
    stack = np.concatenate([stack, np.asarray(reference_FxP, stack.dtype)[None]])
  e, f = stack.shape[:2]
  return stack.reshape(e * f, -1), np.repeat(np.arange(e), f)


def expert_neuron_points(w_ExAxB: np.ndarray, neuron_axis: int) -> tuple[np.ndarray, np.ndarray]:
  """neuron_points of one stacked matrix kind (neuron_axis -1 for gate/up, 1 for down)."""
  return neuron_points(neurons.neuron_vectors(w_ExAxB, neuron_axis))
