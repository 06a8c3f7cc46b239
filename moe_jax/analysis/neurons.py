"""Neuron-level similarity between experts: by averaging and by reordering (Hungarian).

Neuron j of an expert is its hidden unit j: column j of w_gate and w_up ([D, F]) and row j
of w_down ([F, D]). `neuron_axis` names the axis of the F neurons in a stacked array:
-1 for w_gate / w_up [E, D, F], 1 for w_down [E, F, D].
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from moe_jax.analysis import distance, weights

_BLOCK = 256  # rows per block when counting inversions


def neuron_vectors(w_ExAxB: np.ndarray, neuron_axis: int) -> np.ndarray:
  """[E, F, D]: each expert's neurons as rows, from a stacked [E, D, F] or [E, F, D] matrix."""
  return np.moveaxis(np.asarray(w_ExAxB), neuron_axis, 1)


def expert_neurons(w_gate_ExDxF: np.ndarray, w_up_ExDxF: np.ndarray,
                   w_down_ExFxD: np.ndarray) -> np.ndarray:
  """[E, F, 3D]: neuron j = concat(gate column j, up column j, down row j)."""
  return np.concatenate([neuron_vectors(w_gate_ExDxF, -1), neuron_vectors(w_up_ExDxF, -1),
                         neuron_vectors(w_down_ExFxD, 1)], axis=-1)


def dense_neurons(w_gate_DxF: np.ndarray, w_up_DxF: np.ndarray,
                  w_down_FxD: np.ndarray) -> np.ndarray:
  """[F, 3D]: the dense FFN's neurons, laid out as expert_neurons lays out one expert."""
  return expert_neurons(w_gate_DxF[None], w_up_DxF[None], w_down_FxD[None])[0]


def mean_neuron_vectors(w_ExAxB: np.ndarray, neuron_axis: int) -> np.ndarray:
  """[E, D]: each expert's mean neuron (float64), the "averaging" view of an expert."""
  return neuron_vectors(w_ExAxB, neuron_axis).mean(axis=1, dtype=np.float64)


def averaged_cosine(w_ExAxB: np.ndarray, neuron_axis: int,
                    reference: np.ndarray | None = None) -> np.ndarray:
  """[E, E] (or [E+1, E+1], reference LAST) cosine between experts' mean neurons.

  `reference` is one unstacked matrix ([D, F] or [F, D], same layout as an expert)."""
  mean_ExD = mean_neuron_vectors(w_ExAxB, neuron_axis)
  if reference is not None:
    mean_ExD = np.concatenate([mean_ExD, mean_neuron_vectors(np.asarray(reference)[None],
                                                             neuron_axis)])
  return weights.row_cosine(mean_ExD)


def count_inversions(y_N: np.ndarray, block: int = _BLOCK) -> int:
  """Number of pairs i < j with y[i] > y[j], vectorised over blocks of rows (O(N^2))."""
  y_N = np.asarray(y_N)
  n, total = y_N.shape[0], 0
  for s in range(0, n, block):
    rows_B = y_N[s:s + block]
    later_BxN = np.arange(n)[None, :] > np.arange(s, s + rows_B.shape[0])[:, None]
    total += int(np.count_nonzero((rows_B[:, None] > y_N[None, :]) & later_BxN))
  return total


def kendall_tau(x_N: np.ndarray, y_N: np.ndarray | None = None) -> float:
  """Kendall's tau between x and y (y = identity 0..N-1 when omitted); assumes no ties.

  tau = (concordant - discordant) / C(N, 2) = 1 - 4 * inversions / (N (N - 1)), where the
  inversions are counted in y ordered by x. NaN for N < 2, as scipy.stats.kendalltau."""
  x_N = np.asarray(x_N)
  y_N = np.arange(x_N.shape[0]) if y_N is None else np.asarray(y_N)
  n = x_N.shape[0]
  if n < 2:
    return float("nan")
  inv = count_inversions(y_N[np.argsort(x_N, kind="stable")])
  return 1.0 - 4.0 * inv / (n * (n - 1))


def neuron_cosine(a_FxP: np.ndarray, b_FxP: np.ndarray) -> np.ndarray:
  """[F, F] cosine between every neuron of expert a (rows) and every neuron of b (cols)."""
  return weights.cross_cosine(a_FxP, b_FxP)


def reordered_similarity(a_FxP: np.ndarray, b_FxP: np.ndarray) -> dict:
  """Match b's neurons to a's (max total cosine), then compare.

  permutation[i] is the neuron of b matched to neuron i of a, so b[permutation] lines up
  with a. cosine: cosine between flattened a and b[permutation] (Look-into-MoEs);
  mean_neuron_cosine: mean cosine of the matched neuron pairs; kendall_tau: of the
  permutation against the identity (1 when no reordering was needed)."""
  cos_FxF = neuron_cosine(a_FxP, b_FxP)
  rows_F, perm_F = linear_sum_assignment(cos_FxF, maximize=True)
  perm_F = perm_F[np.argsort(rows_F)]
  return dict(cosine=distance.to_base(a_FxP, np.asarray(b_FxP)[perm_F])["cosine"],
              mean_neuron_cosine=float(cos_FxF[np.arange(len(perm_F)), perm_F].mean()),
              kendall_tau=kendall_tau(perm_F),
              permutation=perm_F.astype(np.int64))


def pairwise_reordered(neurons_ExFxP: np.ndarray,
                       reference_FxP: np.ndarray | None = None) -> dict:
  """[E, E] (or [E+1, E+1], reference LAST) reordered cosine and Kendall tau, all pairs.

  Symmetric: matching b to a is the inverse permutation of matching a to b, which has the
  same tau and cosine. The diagonal is the plain self-similarity (cosine 1, tau 1)."""
  stack = np.asarray(neurons_ExFxP)
  if reference_FxP is not None:
    stack = np.concatenate([stack, np.asarray(reference_FxP, stack.dtype)[None]])
  n, f = stack.shape[0], stack.shape[1]
  cos_NxN = np.diag(np.diag(weights.flat_cosine(stack)))
  tau_NxN = np.diag(np.full(n, 1.0 if f > 1 else np.nan))
  for i in range(n):
    for j in range(i + 1, n):
      r = reordered_similarity(stack[i], stack[j])
      cos_NxN[i, j] = cos_NxN[j, i] = r["cosine"]
      tau_NxN[i, j] = tau_NxN[j, i] = r["kendall_tau"]
  return dict(cosine=cos_NxN, kendall_tau=tau_NxN)
