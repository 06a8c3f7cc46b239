"""Static MoE analyses (moe_jax.analysis) against independent plain-numpy/scipy references."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats

from moe_jax.analysis import distance, neurons, pca, router, weights

D, F, E = 16, 48, 4


def ref_cosine(a, b) -> float:
  """Reference cosine of two arrays, flattened; 0 for a zero vector."""
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  na, nb = np.sqrt(np.sum(a * a)), np.sqrt(np.sum(b * b))
  return 0.0 if na == 0 or nb == 0 else float(np.sum(a * b) / (na * nb))


def ref_cosine_matrix(mats) -> np.ndarray:
  return np.array([[ref_cosine(x, y) for y in mats] for x in mats])


def dense_ffn(rng, d=D, f=F):
  return tuple(rng.normal(0, 0.02, s).astype(np.float32) for s in ((d, f), (d, f), (f, d)))


def permuted_experts(rng, e=E):
  """Experts that are neuron permutations of one dense FFN: expert k's neuron j is the
  dense neuron perms[k][j]."""
  gate, up, down = dense_ffn(rng)
  perms = [rng.permutation(F) for _ in range(e)]
  return ((gate, up, down), perms, np.stack([gate[:, p] for p in perms]),
          np.stack([up[:, p] for p in perms]), np.stack([down[p] for p in perms]))


# ---- matrix-level cosine ------------------------------------------------------------------

def test_weight_cosine_matches_reference_with_and_without_reference_matrix():
  rng = np.random.default_rng(0)
  w = (rng.normal(size=(E, D, F)) + 0.5 * rng.normal(size=(1, D, F))).astype(np.float32)
  ref = rng.normal(size=(D, F)).astype(np.float32)
  np.testing.assert_allclose(weights.weight_cosine(w), ref_cosine_matrix(list(w)), atol=1e-10)
  got = weights.weight_cosine(w, ref)
  assert got.shape == (E + 1, E + 1)
  np.testing.assert_allclose(got, ref_cosine_matrix(list(w) + [ref]), atol=1e-10)  # reference LAST
  # Column-blocked float64 accumulation gives the same matrix as one block.
  np.testing.assert_allclose(weights.cosine_from_gram(weights.gram(w.reshape(E, -1), chunk=7)),
                             got[:E, :E], atol=1e-12)


def test_copy_experts_with_reference_are_all_ones():
  ref = np.random.default_rng(1).normal(size=(D, F)).astype(np.float32)
  got = weights.weight_cosine(np.stack([ref] * E), ref)
  assert got.shape == (E + 1, E + 1)
  np.testing.assert_allclose(got, np.ones((E + 1, E + 1)), atol=1e-12)


def test_zero_matrix_gives_zero_not_nan():
  w = np.random.default_rng(2).normal(size=(E, D, F))
  w[1] = 0.0
  got = weights.weight_cosine(w, np.zeros((D, F)))
  assert np.all(np.isfinite(got))
  assert np.all(got[1] == 0) and np.all(got[:, 1] == 0) and np.all(got[E] == 0)
  np.testing.assert_allclose(np.diag(got)[[0, 2, 3]], 1.0)
  assert np.all(weights.flat_cosine(np.zeros((3, 5, 2))) == 0)
  assert np.all(neurons.averaged_cosine(np.zeros((2, D, F)), -1) == 0)


@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_cross_cosine_matches_scipy_cdist(dtype, atol):
  rng = np.random.default_rng(20)
  a, b = rng.normal(size=(7, 3 * D)), rng.normal(size=(5, 3 * D)) + 0.5
  a[2] = 0.0
  got = weights.cross_cosine(a.astype(np.float32), b.astype(np.float32), dtype)
  want = 1.0 - scipy.spatial.distance.cdist(a.astype(np.float32), b.astype(np.float32),
                                            "cosine")
  want[2] = 0.0  # cdist gives NaN for a zero row; ours gives 0
  assert got.dtype == dtype
  np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_independent_gaussian_experts_have_matrix_cosine_near_zero():
  # For independent zero-mean vectors of n entries, cos ~ N(0, 1/n): 4/sqrt(n) is 4 sd.
  w = np.random.default_rng(3).normal(size=(E, D, F))
  off = weights.weight_cosine(w)[np.triu_indices(E, 1)]
  assert np.all(np.abs(off) < 4 / np.sqrt(D * F))


# ---- neuron level: averaging and reordering -----------------------------------------------

def test_averaged_cosine_matches_loop_reference():
  rng = np.random.default_rng(4)
  w_up = rng.normal(size=(E, D, F)) + 0.3
  w_down = rng.normal(size=(E, F, D)) + 0.3
  ref_up = [np.mean(w_up[e], axis=1) for e in range(E)]      # mean of the F columns
  ref_down = [np.mean(w_down[e], axis=0) for e in range(E)]  # mean of the F rows
  np.testing.assert_allclose(neurons.mean_neuron_vectors(w_up, -1), np.stack(ref_up), atol=1e-12)
  np.testing.assert_allclose(neurons.averaged_cosine(w_up, -1), ref_cosine_matrix(ref_up),
                             atol=1e-10)
  np.testing.assert_allclose(neurons.averaged_cosine(w_down, 1), ref_cosine_matrix(ref_down),
                             atol=1e-10)
  dense_up = rng.normal(size=(D, F)) + 0.3
  np.testing.assert_allclose(neurons.averaged_cosine(w_up, -1, dense_up),
                             ref_cosine_matrix(ref_up + [dense_up.mean(axis=1)]), atol=1e-10)


def test_expert_neurons_layout():
  (gate, up, down), _, wg, wu, wd = permuted_experts(np.random.default_rng(5))
  n = neurons.expert_neurons(wg, wu, wd)
  assert n.shape == (E, F, 3 * D)
  e, j = 2, 7
  np.testing.assert_array_equal(n[e, j], np.concatenate([wg[e][:, j], wu[e][:, j], wd[e][j]]))
  np.testing.assert_array_equal(neurons.dense_neurons(gate, up, down)[j],
                                np.concatenate([gate[:, j], up[:, j], down[j]]))


def test_lazy_expert_neurons_equal_the_concatenated_array():
  """ExpertNeurons builds experts and row blocks on demand; every analysis that takes it
  gives what the materialised [E, F, 3D] array gives."""
  rng = np.random.default_rng(21)
  wg, wu = rng.normal(size=(E, D, F)), rng.normal(size=(E, D, F))
  wd = rng.normal(size=(E, F, D))
  lazy = neurons.expert_neurons(wg, wu, wd)
  dense = np.concatenate([wg.transpose(0, 2, 1), wu.transpose(0, 2, 1), wd], axis=-1)
  np.testing.assert_array_equal(np.asarray(lazy), dense)
  rows = lazy.rows()
  for a, b in ((0, 7), (F - 3, F + 5), (5, 3 * F + 1), (0, E * F)):  # across experts
    np.testing.assert_array_equal(rows[a:b], dense.reshape(E * F, -1)[a:b])
  got, want = neurons.pairwise_reordered(lazy), neurons.pairwise_reordered(dense)
  for k in ("cosine", "kendall_tau"):
    np.testing.assert_allclose(got[k], want[k], atol=1e-12)
  pts, labels = pca.neuron_points(lazy)
  assert isinstance(pts, neurons.NeuronRows) and pts.shape == (E * F, 3 * D)
  with_rows, with_array = pca.pca_2d(pts), pca.pca_2d(dense.reshape(E * F, -1))
  np.testing.assert_allclose(with_rows[0], with_array[0], atol=1e-9)
  np.testing.assert_allclose(with_rows[1], with_array[1], atol=1e-12)


def test_permuted_experts_reorder_to_one_and_recover_the_permutation():
  (gate, up, down), perms, wg, wu, wd = permuted_experts(np.random.default_rng(6))
  n = neurons.expert_neurons(wg, wu, wd)
  base = neurons.dense_neurons(gate, up, down)
  for k in range(E):
    # Dense neuron i sits at position inverse(perms[k])[i] of expert k.
    r = neurons.reordered_similarity(base, n[k])
    np.testing.assert_array_equal(r["permutation"], np.argsort(perms[k]))
    assert abs(r["cosine"] - 1) < 1e-6 and abs(r["mean_neuron_cosine"] - 1) < 1e-6
    assert r["kendall_tau"] == pytest.approx(
        scipy.stats.kendalltau(np.arange(F), np.argsort(perms[k])).statistic, abs=1e-12)
    # Expert 0's neuron i is dense perms[0][i], found in expert k at inverse(perms[k])[perms[0][i]].
    r = neurons.reordered_similarity(n[0], n[k])
    np.testing.assert_array_equal(r["permutation"], np.argsort(perms[k])[perms[0]])
    assert abs(r["cosine"] - 1) < 1e-6
  # One matrix kind alone (the up columns) recovers the same permutation.
  r = neurons.reordered_similarity(neurons.neuron_vectors(up[None], -1)[0],
                                   neurons.neuron_vectors(wu, -1)[1])
  np.testing.assert_array_equal(r["permutation"], np.argsort(perms[1]))
  pair = neurons.pairwise_reordered(n, base)
  assert pair["cosine"].shape == (E + 1, E + 1)
  np.testing.assert_allclose(pair["cosine"], 1.0, atol=1e-6)
  # Unpermuted matrix cosine is far from 1 for the same experts.
  assert weights.weight_cosine(wu)[0, 1] < 0.5


def test_identical_experts_every_similarity_is_one():
  gate, up, down = dense_ffn(np.random.default_rng(7))
  wg, wu, wd = (np.stack([m] * E) for m in (gate, up, down))
  ones = np.ones((E, E))
  for w, axis in ((wg, -1), (wu, -1), (wd, 1)):
    np.testing.assert_allclose(weights.weight_cosine(w), ones, atol=1e-6)
    np.testing.assert_allclose(neurons.averaged_cosine(w, axis), ones, atol=1e-6)
  pair = neurons.pairwise_reordered(neurons.expert_neurons(wg, wu, wd))
  np.testing.assert_allclose(pair["cosine"], ones, atol=1e-6)
  np.testing.assert_allclose(pair["kendall_tau"], ones, atol=1e-12)
  r = neurons.reordered_similarity(neurons.dense_neurons(gate, up, down),
                                   neurons.dense_neurons(gate, up, down))
  np.testing.assert_array_equal(r["permutation"], np.arange(F))


def test_independent_experts_reordering_tau_near_zero():
  # Under independent i.i.d. experts, b's neurons are exchangeable, so the optimal matching
  # is a uniformly random permutation: tau has mean 0 and variance 2(2F+5)/(9F(F-1)),
  # sd ~0.059 for F=128. 0.3 is ~5 sd (two-sided p ~6e-7 per pair; 6 pairs).
  f = 128
  n = np.random.default_rng(8).normal(size=(E, f, 3 * D))
  pair = neurons.pairwise_reordered(n)
  off = np.triu_indices(E, 1)
  assert np.all(np.abs(pair["kendall_tau"][off]) < 0.3)
  # Matching can only raise the flattened cosine above the unmatched one (~0).
  assert np.all(pair["cosine"][off] > weights.flat_cosine(n)[off])


@pytest.mark.parametrize("n", [1, 2, 3, 10, 255, 256, 257, 600])
def test_kendall_tau_matches_scipy_on_permutations(n):
  rng = np.random.default_rng(n)
  for _ in range(3):
    p = rng.permutation(n)
    with warnings.catch_warnings():  # scipy warns (SmallSampleWarning) and returns NaN for n=1
      warnings.simplefilter("ignore")
      want = scipy.stats.kendalltau(np.arange(n), p).statistic
    got = neurons.kendall_tau(p)
    if n < 2:
      assert np.isnan(got) and np.isnan(want)
      r = neurons.reordered_similarity(np.ones((1, 3)), 2 * np.ones((1, 3)))
      assert r["cosine"] == pytest.approx(1.0) and np.isnan(r["kendall_tau"])
      np.testing.assert_array_equal(r["permutation"], [0])
    else:
      assert got == pytest.approx(want, abs=1e-12)
      q = rng.permutation(n)
      assert neurons.kendall_tau(p, q) == pytest.approx(scipy.stats.kendalltau(p, q).statistic,
                                                         abs=1e-12)
  if n > 1:
    assert neurons.kendall_tau(np.arange(n)) == 1.0
    assert neurons.kendall_tau(np.arange(n)[::-1]) == -1.0


def test_count_inversions_matches_brute_force():
  p = np.random.default_rng(9).permutation(40)
  brute = sum(int(p[i] > p[j]) for i in range(40) for j in range(i + 1, 40))
  assert neurons.count_inversions(p, block=7) == brute


# ---- router vs experts --------------------------------------------------------------------

def test_router_cosine_columns():
  r = np.random.default_rng(10).normal(size=(D, E))
  np.testing.assert_allclose(router.router_cosine(r), ref_cosine_matrix(list(r.T)), atol=1e-10)


def sym(rng, e):
  m = rng.uniform(-1, 1, (e, e))
  m = (m + m.T) / 2
  np.fill_diagonal(m, 1.0)
  return m


def test_router_fit_exact_line_and_reference_row_ignored():
  rng = np.random.default_rng(11)
  wcos = sym(rng, E + 1)           # last row/column: the dense reference, not fitted
  rcos = 0.7 * wcos[:E, :E] + 0.1
  np.fill_diagonal(rcos, 1.0)       # the diagonal is not fitted either
  wcos[E, :E] = wcos[:E, E] = rng.uniform(-1, 1, E)
  fit = router.router_fit(rcos, wcos)
  assert fit["slope"] == pytest.approx(0.7, abs=1e-12)
  assert fit["intercept"] == pytest.approx(0.1, abs=1e-12)
  assert fit["r2"] == pytest.approx(1.0, abs=1e-12) and fit["r"] == pytest.approx(1.0, abs=1e-12)
  assert fit["n"] == E * (E - 1) // 2


def test_router_fit_matches_numpy_on_random():
  rng = np.random.default_rng(12)
  e = 8
  wcos, rcos = sym(rng, e), sym(rng, e)
  iu = np.triu_indices(e, 1)
  fit = router.router_fit(rcos, wcos)
  r = np.corrcoef(wcos[iu], rcos[iu])[0, 1]
  slope, intercept = np.polyfit(wcos[iu], rcos[iu], 1)
  assert fit["r"] == pytest.approx(r, abs=1e-12)
  assert fit["r2"] == pytest.approx(r * r, abs=1e-12)
  assert fit["slope"] == pytest.approx(slope, abs=1e-10)
  assert fit["intercept"] == pytest.approx(intercept, abs=1e-10)
  layers = router.layer_fits([rcos, rcos], [wcos, wcos])
  assert layers["mean_r2"] == pytest.approx(r * r, abs=1e-12)


def test_router_fit_constant_inputs():
  rng = np.random.default_rng(13)
  fit = router.router_fit(sym(rng, E), np.ones((E, E)))   # copy experts: all weight cos 1
  assert fit["r"] == 0.0 and fit["r2"] == 0.0 and fit["slope"] == 0.0
  fit = router.router_fit(np.ones((E, E)), sym(rng, E))
  assert fit["r"] == 0.0 and fit["slope"] == 0.0 and fit["intercept"] == pytest.approx(1.0)


# ---- PCA ----------------------------------------------------------------------------------

def ref_pca(x, k=2):
  """Top-k eigenvectors of the covariance (numpy.linalg.eigh), largest-|entry| positive."""
  xc = x - x.mean(axis=0)
  val, vec = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
  val, vec = val[::-1], vec[:, ::-1]
  axes = vec[:, :k].T
  axes = axes * np.sign(axes[np.arange(k), np.argmax(np.abs(axes), axis=1)])[:, None]
  return xc @ axes.T, val[:k] / val.sum(), axes


def test_pca_matches_covariance_eigh():
  rng = np.random.default_rng(14)
  x = rng.normal(size=(40, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 2.0
  x = x @ np.linalg.qr(rng.normal(size=(6, 6)))[0]   # rotate: axes are not coordinate axes
  coords, ratio = pca.pca_2d(x)
  want_coords, want_ratio, want_axes = ref_pca(x)
  np.testing.assert_allclose(coords, want_coords, atol=1e-9)
  np.testing.assert_allclose(ratio, want_ratio, atol=1e-12)
  _, axes, _ = pca.principal_axes(x)
  np.testing.assert_allclose(axes, want_axes, atol=1e-9)
  # The sign convention fixes the axes, so negating the data negates the coordinates.
  np.testing.assert_allclose(pca.pca_2d(-x)[0], -coords, atol=1e-9)
  assert np.all(np.max(axes, axis=1) == np.max(np.abs(axes), axis=1))


def test_pca_rank_deficient():
  coords, ratio = pca.pca_2d(np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]]))
  np.testing.assert_allclose(ratio, [1.0, 0.0])
  np.testing.assert_allclose(np.abs(coords[:, 0]), [1.5, 1.5])
  np.testing.assert_allclose(coords[:, 1], 0.0, atol=1e-12)
  coords, ratio = pca.pca_2d(np.ones((3, 4)))
  assert np.all(coords == 0) and np.all(ratio == 0)


def test_pca_points():
  rng = np.random.default_rng(15)
  w = rng.normal(size=(E, D, F))
  ref = rng.normal(size=(D, F))
  pts = pca.expert_points(w, ref)
  assert pts.shape == (E + 1, D * F)
  np.testing.assert_array_equal(pts[E], ref.ravel())
  pts, labels = pca.expert_neuron_points(w, -1)
  assert pts.shape == (E * F, D)
  np.testing.assert_array_equal(pts[F + 3], w[1][:, 3])
  np.testing.assert_array_equal(labels, np.repeat(np.arange(E), F))
  pts, labels = pca.neuron_points(neurons.neuron_vectors(w, -1), ref.T)
  assert pts.shape == ((E + 1) * F, D) and labels[-1] == E
  np.testing.assert_array_equal(pts[E * F + 5], ref[:, 5])


# ---- distance to the base -----------------------------------------------------------------

def test_to_base_identical_and_reference():
  rng = np.random.default_rng(16)
  a = rng.normal(size=(D, F)).astype(np.float32)
  assert distance.to_base(a, a) == {"cosine": pytest.approx(1.0, abs=1e-12), "rel_l2": 0.0}
  b = a + rng.normal(0, 0.1, a.shape).astype(np.float32)
  got = distance.to_base(b, a)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  assert got["cosine"] == pytest.approx(ref_cosine(a, b), abs=1e-12)
  assert got["rel_l2"] == pytest.approx(np.linalg.norm(b64 - a64) / np.linalg.norm(a64), rel=1e-10)
  z = np.zeros_like(a)
  assert distance.to_base(z, z) == {"cosine": 0.0, "rel_l2": 0.0}
  assert distance.to_base(a, z)["rel_l2"] == np.inf


@pytest.mark.parametrize("r", [0.25, 0.5, 0.75])
def test_drop_style_redraw_cosine_is_one_minus_r(r):
  # Redraw a fraction r of the columns of a (zero-mean i.i.d. entries) from an independent
  # distribution with the same mean/std. Then <a, b> = sum over kept entries of a^2 + sum of
  # a * c over the redrawn ones, so E<a, b> = (1 - r) ||a||^2, and ||b|| ~ ||a||: cos ~ 1 - r.
  # Likewise ||a - b||^2 = sum over redrawn (a - c)^2 ~ 2r ||a||^2: rel_l2 ~ sqrt(2r).
  # With n = 256*512 entries the fluctuations are O(1/sqrt(n r)) ~ 0.005, so 0.02 holds.
  rng = np.random.default_rng(17)
  a = rng.normal(0, 0.02, (256, 512)).astype(np.float32)
  cols = rng.choice(512, int(round(r * 512)), replace=False)
  b = a.copy()
  b[:, cols] = rng.normal(a.mean(), a.std(), (256, cols.size))
  got = distance.to_base(b, a)
  assert abs(got["cosine"] - (1 - r)) < 0.02
  assert abs(got["rel_l2"] - np.sqrt(2 * r)) < 0.02


def test_experts_and_group_to_base():
  rng = np.random.default_rng(18)
  gate, up, down = dense_ffn(rng)
  wg = np.stack([gate, gate + 0.01 * rng.normal(size=gate.shape), rng.normal(size=gate.shape)])
  got = distance.experts_to_base(wg, gate)
  np.testing.assert_allclose(got["cosine"], [ref_cosine(w, gate) for w in wg], atol=1e-10)
  np.testing.assert_allclose(got["rel_l2"], [np.linalg.norm(w - gate) / np.linalg.norm(gate)
                                             for w in wg.astype(np.float64)], rtol=1e-6)
  assert got["cosine"][0] == pytest.approx(1.0) and got["rel_l2"][0] == 0.0
  # Per-expert references (the matching shards for virtual-group experts).
  shards = np.stack([gate[:, :F // 2], gate[:, F // 2:]])
  got = distance.experts_to_base(shards, shards)
  np.testing.assert_allclose(got["cosine"], 1.0)
  params = {"w_gate": wg, "w_up": up, "router": rng.normal(size=(D, 3))}
  out = distance.group_to_base(params, {"w_gate": gate, "w_up": up, "w_down": down})
  assert set(out) == {"w_gate", "w_up"}
  assert out["w_gate"]["cosine"].shape == (3,)
  assert out["w_up"] == {"cosine": pytest.approx(1.0), "rel_l2": 0.0}
  with pytest.raises(ValueError):
    distance.group_to_base({"w_up": up.T}, {"w_up": up})
