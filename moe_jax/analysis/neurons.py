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


class ExpertNeurons:
  """[E, F, P] every expert's neurons, neuron j = (gate column j | up column j | down row j),
  P = 3D, as views of the stacked matrices. An expert (`self[e]`), or a block of the
  expert-major [E*F, P] rows (`self.rows()[a:b]`), is built only when indexed, so a layer's
  experts are never held twice. `np.asarray(self)` builds the whole array."""

  def __init__(self, w_gate_ExDxF: np.ndarray, w_up_ExDxF: np.ndarray,
               w_down_ExFxD: np.ndarray):
    self._mats = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    e, d, f = w_gate_ExDxF.shape
    self.shape = (e, f, 2 * d + w_down_ExFxD.shape[-1])
    self.dtype = np.result_type(*self._mats)

  def __len__(self) -> int:
    return self.shape[0]

  def expert(self, e: int, neurons: slice = slice(None)) -> np.ndarray:
    """[n, P] the `neurons` of expert e."""
    g, u, d = self._mats
    return np.concatenate([g[e][:, neurons].T, u[e][:, neurons].T, d[e][neurons]], axis=-1)

  def __getitem__(self, key):
    if isinstance(key, (int, np.integer)):
      return self.expert(int(key))
    return np.asarray(self)[key]

  def __array__(self, dtype=None, copy=None):
    out = np.stack([self.expert(e) for e in range(len(self))])
    return out if dtype is None else out.astype(dtype)

  def rows(self) -> NeuronRows:
    return NeuronRows(self)


class NeuronRows:
  """[E*F, P] the neurons of ExpertNeurons, expert-major; a row slice builds only its rows."""

  def __init__(self, neurons: ExpertNeurons):
    self._neurons = neurons
    e, self._f, p = neurons.shape
    self.shape, self.dtype = (e * self._f, p), neurons.dtype

  def __getitem__(self, rows: slice) -> np.ndarray:
    start, stop, step = rows.indices(self.shape[0])
    if step != 1:
      raise ValueError("NeuronRows: only contiguous row slices")
    f, parts = self._f, []
    for e in range(start // f, -(-stop // f)):
      parts.append(self._neurons.expert(e, slice(max(start - e * f, 0), min(stop - e * f, f))))
    return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.dtype)

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out if dtype is None else out.astype(dtype)


def expert_neurons(w_gate_ExDxF: np.ndarray, w_up_ExDxF: np.ndarray,
                   w_down_ExFxD: np.ndarray) -> ExpertNeurons:
  """[E, F, 3D]: neuron j = concat(gate column j, up column j, down row j), built lazily."""
  return ExpertNeurons(np.asarray(w_gate_ExDxF), np.asarray(w_up_ExDxF),
                       np.asarray(w_down_ExFxD))


def dense_neurons(w_gate_DxF: np.ndarray, w_up_DxF: np.ndarray,
                  w_down_FxD: np.ndarray) -> np.ndarray:
  """[F, 3D]: the dense FFN's neurons, laid out as expert_neurons lays out one expert."""
  return expert_neurons(np.asarray(w_gate_DxF)[None], np.asarray(w_up_DxF)[None],
                        np.asarray(w_down_FxD)[None])[0]


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
  return weights.cross_cosine(a_FxP, b_FxP, np.float32)  # F x F: float32 is ample


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
              mean_neuron_cosine=float(cos_FxF[np.arange(len(perm_F)), perm_F].mean(
                  dtype=np.float64)),
              kendall_tau=kendall_tau(perm_F),
              permutation=perm_F.astype(np.int64))


def pairwise_reordered(neurons_ExFxP: np.ndarray | ExpertNeurons,
                       reference_FxP: np.ndarray | None = None) -> dict:
  """[E, E] (or [E+1, E+1], reference LAST) reordered cosine and Kendall tau, all pairs.

  Symmetric: matching b to a is the inverse permutation of matching a to b, which has the
  same tau and cosine. The diagonal is the plain self-similarity (cosine 1, tau 1; cosine
  0 for an all-zero expert). Experts are indexed one at a time (ExpertNeurons builds each
  only then)."""
  stack = (neurons_ExFxP if isinstance(neurons_ExFxP, ExpertNeurons)
           else np.asarray(neurons_ExFxP))
  e, f = stack.shape[0], stack.shape[1]
  get = lambda i: stack[i] if i < e else np.asarray(reference_FxP)
  n = e + (reference_FxP is not None)
  cos_NxN = np.diag([1.0 if np.any(get(i)) else 0.0 for i in range(n)])
  tau_NxN = np.diag(np.full(n, 1.0 if f > 1 else np.nan))
  for i in range(n):
    a_FxP = get(i)
    for j in range(i + 1, n):
      r = reordered_similarity(a_FxP, get(j))
      cos_NxN[i, j] = cos_NxN[j, i] = r["cosine"]
      tau_NxN[i, j] = tau_NxN[j, i] = r["kendall_tau"]
  return dict(cosine=cos_NxN, kendall_tau=tau_NxN)
