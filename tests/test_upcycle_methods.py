"""Upcycling methods and router init against an independent plain-numpy MoE forward."""
import warnings

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from moe_jax.upcycle import methods, router_init
from moe_jax.upcycle.methods import DenseFfn, UpcycleSpec

D, F, E = 32, 64, 8


# ---- reference: plain numpy routing + weighted sum of expert SwiGLUs ---------------------

def swiglu(x, wg, wu, wd):
  h = x @ wg
  return (h / (1 + np.exp(-h)) * (x @ wu)) @ wd


def route(logits_TxE, router, k, norm_topk_prob=False):
  """(weights [T, k], expert ids [T, k]); ties go to the lower expert id."""
  if router == "topk_softmax":
    ids = np.argsort(-logits_TxE, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logits_TxE, ids, 1)
    w = np.exp(top - top.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True), ids
  if router == "softmax_topk":
    p = np.exp(logits_TxE - logits_TxE.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, 1)
    return (w / w.sum(1, keepdims=True) if norm_topk_prob else w), ids
  assert router == "sigmoid_bias"  # zero bias
  s = 1 / (1 + np.exp(-logits_TxE))
  ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
  w = np.take_along_axis(s, ids, 1)
  return w / w.sum(1, keepdims=True), ids


def moe(x_TxD, ex, router_DxE, spec):
  w, ids = route(x_TxD @ router_DxE, spec.router, spec.top_k, spec.norm_topk_prob)
  out_ExTxD = np.stack([swiglu(x_TxD, *p) for p in zip(ex.w_gate_ExDxFe, ex.w_up_ExDxFe,
                                                        ex.w_down_ExFexD)])
  t = np.arange(len(x_TxD))[:, None]
  y = np.sum(w[..., None] * out_ExTxD[ids, t], axis=1)
  return y + (swiglu(x_TxD, *ex.shared) if ex.shared is not None else 0)


def make_dense(rng, d=D, f=F, dtype=np.float32):
  return DenseFfn(*(rng.normal(0, 1 / np.sqrt(n), s).astype(dtype)
                    for n, s in ((d, (d, f)), (d, (d, f)), (f, (f, d)))))


def max_err(spec, router_kind, std=0.02, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  dense = make_dense(rng, dtype=dtype)
  x = rng.normal(size=(64, D)).astype(dtype)
  ex = methods.METHODS[spec.method](dense, spec, rng)
  router = router_init.init_router(router_kind, D, spec.num_experts, rng, std=std,
                                   repeat=ex.router_repeat).astype(dtype)
  return float(np.abs(moe(x, ex, router, spec) - swiglu(x, *dense)).max())


# ---- function preservation ---------------------------------------------------------------

@pytest.mark.parametrize("router", ["topk_softmax", "sigmoid_bias"])
def test_copy_is_dense_with_random_router(router):
  assert max_err(UpcycleSpec("copy", E, 2, router=router), "normal", std=1.0) <= 1e-5


VG = [(g, t) for g in (1, 2, 4, 8) for t in (g, 2 * g) if t <= E]


@pytest.mark.parametrize("g,t", VG)
def test_virtual_group_exact(g, t):
  for router, kind, norm in (("topk_softmax", "normal", False), ("sigmoid_bias", "normal", False),
                             ("softmax_topk", "zeros", False), ("softmax_topk", "zeros", True),
                             ("softmax_topk", "normal", True) if t == E else (None,) * 3):
    if router is None:
      continue
    spec = UpcycleSpec("virtual_group", E, t, granularity=g, router=router, norm_topk_prob=norm)
    assert max_err(spec, kind, std=1.0) <= 1e-5, (router, kind, norm)


def test_virtual_group_down_scale_and_shards():
  rng = np.random.default_rng(0)
  dense = make_dense(rng)
  for router, a in (("topk_softmax", 4), ("softmax_topk", E * 4 / 4)):
    ex = methods.virtual_group(dense, UpcycleSpec("virtual_group", E, 4, 4, router), rng)
    assert ex.router_repeat == 4 and ex.w_gate_ExDxFe.shape == (E, D, F // 4)
    for e in range(E):
      s = slice((e % 4) * F // 4, (e % 4 + 1) * F // 4)
      np.testing.assert_array_equal(ex.w_gate_ExDxFe[e], dense.w_gate_DxF[:, s])
      np.testing.assert_array_equal(ex.w_up_ExDxFe[e], dense.w_up_DxF[:, s])
      np.testing.assert_allclose(ex.w_down_ExFexD[e], a * dense.w_down_FxD[s], rtol=1e-6)


@pytest.mark.parametrize("g,t", [(g, t) for g, t in VG if t < E])
def test_softmax_topk_error_shrinks_with_router_std(g, t):
  spec = UpcycleSpec("virtual_group", E, t, granularity=g, router="softmax_topk")
  errors = {s: max_err(spec, "normal", std=s, dtype=np.float64) for s in (1.0, 0.1, 0.01, 0.001)}
  print(f"virtual_group G={g} T={t} softmax_topk max |MoE - dense| by router std:",
        {s: f"{v:.3g}" for s, v in errors.items()})
  values = list(errors.values())
  assert all(a > b for a, b in zip(values, values[1:])), errors
  assert values[-1] < 1e-2 * values[0]


@pytest.mark.parametrize("mode", ["random", "kmeans"])
@pytest.mark.parametrize("router,kind", [("topk_softmax", "zeros"), ("softmax_topk", "zeros"),
                                         ("sigmoid_bias", "zeros"), ("topk_softmax", "normal")])
def test_partition_with_all_experts_is_dense(mode, router, kind):
  # k = E: every expert is chosen. topk_softmax/sigmoid: any router gives weights summing
  # to 1, but only a uniform one gives 1/E each; the check needs uniform weights.
  spec = UpcycleSpec("partition", E, E, router=router, partition=mode)
  err = max_err(spec, kind, std=1.0)
  assert (err <= 1e-5) == (kind == "zeros"), err


def test_partition_scale():
  """Down carries s / w0: E for weights summing to 1, E^2/k for softmax_topk; an explicit
  output_scale replaces E/k."""
  rng = np.random.default_rng(0)
  dense = make_dense(rng)
  for router, k, scale, want in (("topk_softmax", 2, None, E), ("softmax_topk", 2, None, E * E / 2),
                                 ("softmax_topk", 2, 0.0, E * E / 2), ("topk_softmax", 2, 3.0, 6.0)):
    spec = UpcycleSpec("partition", E, k, router=router, output_scale=scale)
    ex = methods.partition(dense, spec, np.random.default_rng(1))
    sets = methods.partition_sets(dense, spec, np.random.default_rng(1))
    for e, s in enumerate(sets):
      np.testing.assert_array_equal(ex.w_gate_ExDxFe[e], dense.w_gate_DxF[:, s])
      np.testing.assert_allclose(ex.w_down_ExFexD[e], want * dense.w_down_FxD[s], rtol=1e-6)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(e=st.sampled_from([1, 2, 4, 8, 16]), mult=st.integers(1, 6),
                  mode=st.sampled_from(["random", "kmeans"]), seed=st.integers(0, 2**16))
def test_partition_sets_disjoint_cover_balanced(e, mult, mode, seed):
  f = e * mult
  dense = make_dense(np.random.default_rng(seed), d=8, f=f)
  spec = UpcycleSpec("partition", e, 1, partition=mode)
  sets = methods.partition_sets(dense, spec, np.random.default_rng(seed))
  assert sorted(np.concatenate(sets).tolist()) == list(range(f))
  assert [len(s) for s in sets] == [mult] * e
  again = methods.partition_sets(dense, spec, np.random.default_rng(seed))
  assert all(np.array_equal(a, b) for a, b in zip(sets, again))


def test_balanced_kmeans_finds_balanced_clusters():
  """Four well-separated blobs of 25 points: balanced k-means recovers them exactly."""
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 10)) * 10
  truth = np.repeat(np.arange(4), 25)
  labels = methods.balanced_kmeans(centers[truth] + rng.normal(size=(100, 10)), 4, rng)
  assert np.bincount(labels).tolist() == [25] * 4
  assert len({(t, l) for t, l in zip(truth, labels)}) == 4  # a bijection of clusters
  # Unequal blobs (40/20/20/20) still give equal sizes.
  truth = np.repeat(np.arange(4), [40, 20, 20, 20])
  labels = methods.balanced_kmeans(centers[truth] + rng.normal(size=(100, 10)), 4, rng)
  assert np.bincount(labels).tolist() == [25] * 4


# ---- drop, noise, merge ------------------------------------------------------------------

def changed(ex, dense, e):
  return [np.flatnonzero((ex.w_gate_ExDxFe[e] != dense.w_gate_DxF).any(0)),
          np.flatnonzero((ex.w_up_ExDxFe[e] != dense.w_up_DxF).any(0)),
          np.flatnonzero((ex.w_down_ExFexD[e] != dense.w_down_FxD).any(1))]


@pytest.mark.parametrize("shared", [False, True])
def test_drop_reinitialises_exactly_the_drawn_neurons(shared):
  rng = np.random.default_rng(0)
  d, f, r = 256, 512, 0.5
  dense = DenseFfn(rng.normal(0.3, 0.7, (d, f)).astype(np.float32),
                   rng.normal(-0.2, 0.3, (d, f)).astype(np.float32),
                   rng.normal(0.0, 1.5, (f, d)).astype(np.float32))
  spec = UpcycleSpec("drop", 4, 2, drop_ratio=r, drop_shared_indices=shared)
  ex = methods.drop(dense, spec, np.random.default_rng(5))
  idx = methods.drop_indices(f, spec, np.random.default_rng(5))
  n = round(r * f)
  for e in range(4):
    diff = changed(ex, dense, e)
    for m in range(3):
      assert len(diff[m]) == n and np.array_equal(diff[m], idx[e, m]), (e, m)
    same = [np.array_equal(diff[0], diff[m]) for m in (1, 2)]
    assert all(same) if shared else not any(same)
  for m, orig in enumerate(dense):  # new values ~ N(mean, std) of the whole original matrix
    new = np.concatenate([ex[m][e][:, idx[e, m]] if m < 2 else ex[m][e][idx[e, m]]
                          for e in range(4)], axis=None)
    assert abs(new.mean() - orig.mean()) < 0.02 * orig.std(), m
    assert abs(new.std() / orig.std() - 1) < 0.02, m


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(r=st.floats(0, 1), f=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_drop_counts(r, f, seed):
  dense = make_dense(np.random.default_rng(seed), d=4, f=f)
  spec = UpcycleSpec("drop", 3, 1, drop_ratio=r)
  ex = methods.drop(dense, spec, np.random.default_rng(seed))
  for e in range(3):
    assert [len(c) for c in changed(ex, dense, e)] == [round(r * f)] * 3


def test_noise_perturbs_every_weight():
  rng = np.random.default_rng(0)
  dense = make_dense(rng, d=128, f=256)
  ex = methods.noise(dense, UpcycleSpec("noise", 4, 2, noise_std=0.05), rng)
  for m, w in enumerate(dense):
    delta = ex[m] - w[None]
    assert ex[m].dtype == w.dtype and np.all(delta != 0)
    assert abs(delta.std() / 0.05 - 1) < 0.02 and abs(delta.mean()) < 1e-3


def test_merge_takes_expert_i_from_model_i():
  rng = np.random.default_rng(0)
  denses = [make_dense(rng, d=4, f=6) for _ in range(3)]
  ex = methods.METHODS["merge"](denses, UpcycleSpec("merge", 3, 1, shared_expert=True), rng)
  for i in range(3):
    for m in range(3):
      np.testing.assert_array_equal(ex[m][i], denses[i][m])
  np.testing.assert_allclose(ex.shared.w_up_DxF, np.mean([d.w_up_DxF for d in denses], 0), rtol=1e-6)
  bad = denses[:2] + [make_dense(rng, d=4, f=8)]
  with pytest.raises(ValueError, match=r"^merge source 2: FFN shapes"):
    methods.merge_experts(bad, UpcycleSpec("merge", 3, 1))
  with pytest.raises(ValueError, match="num_experts=4 but 3 merge sources"):
    methods.merge_experts(denses, UpcycleSpec("merge", 4, 1))


def test_average_params():
  a, b = np.ones((2, 3), np.float32), np.full((2, 3), 3, np.float32)
  out = methods.average_params([a, b])
  assert out.dtype == np.float32 and np.all(out == 2)
  with pytest.raises(ValueError, match="source 1 has shape"):
    methods.average_params([a, np.ones((3, 2))])


@pytest.mark.parametrize("method", sorted(set(methods.METHODS) - set(methods.MERGE_METHODS)))
def test_shared_expert_is_the_dense_ffn(method):
  rng = np.random.default_rng(0)
  dense = make_dense(rng)
  for shared in (False, True):
    spec = UpcycleSpec(method, E, 2, granularity=2 if method == "virtual_group" else 1,
                       shared_expert=shared)
    ex = methods.METHODS[method](dense, spec, rng)
    assert (ex.shared is dense) if shared else ex.shared is None
    assert ex.router_DxE is None and ex.w_gate_ExDxFe.dtype == np.float32
  x = rng.normal(size=(8, D)).astype(np.float32)
  router = router_init.init_router("normal", D, E, rng, repeat=ex.router_repeat)
  if method == "copy":
    np.testing.assert_allclose(moe(x, ex, router, spec), 2 * swiglu(x, *dense), atol=1e-5)


# ---- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("spec,msg", [
    (dict(method="virtual_group", num_experts=8, top_k=2, granularity=5), "upcycle.granularity=5 does not divide ffn_dim=96"),
    (dict(method="virtual_group", num_experts=6, top_k=2, granularity=4), "upcycle.num_experts=6 is not a multiple of granularity=4"),
    (dict(method="virtual_group", num_experts=8, top_k=3, granularity=2), "upcycle.topk=3 is not a multiple of granularity=2"),
    (dict(method="copy", num_experts=8, top_k=2, granularity=2), "upcycle.granularity=2"),
    (dict(method="copy", num_experts=8, top_k=9), "upcycle.topk=9"),
    (dict(method="copy", num_experts=0, top_k=1), "upcycle.num_experts=0"),
    (dict(method="magic", num_experts=8, top_k=2), "upcycle.method='magic'"),
    (dict(method="copy", num_experts=8, top_k=2, router="argmax"), "upcycle.router='argmax'"),
    (dict(method="partition", num_experts=5, top_k=2), "upcycle.num_experts=5 does not divide ffn_dim=96"),
    (dict(method="partition", num_experts=8, top_k=2, partition="graph"), "upcycle.partition='graph'"),
    (dict(method="partition", num_experts=8, top_k=2, output_scale=-1.0), "upcycle.output_scale=-1.0"),
    (dict(method="drop", num_experts=8, top_k=2, drop_ratio=1.5), "upcycle.drop_ratio=1.5"),
    (dict(method="drop", num_experts=8, top_k=2, drop_ratio=-0.1), "upcycle.drop_ratio=-0.1"),
    (dict(method="noise", num_experts=8, top_k=2, noise_std=-1.0), "upcycle.noise_std=-1.0"),
])
def test_bad_specs_are_one_line_errors(spec, msg):
  with pytest.raises(ValueError) as err:
    UpcycleSpec(**spec).validate(96)
  assert msg in str(err.value) and "\n" not in str(err.value)
  rng = np.random.default_rng(0)
  if spec["method"] in methods.METHODS and spec["method"] not in methods.MERGE_METHODS:
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")):
      methods.METHODS[spec["method"]](make_dense(rng, d=4, f=96), UpcycleSpec(**spec), rng)


# ---- router init -------------------------------------------------------------------------

@pytest.mark.parametrize("repeat", [1, 2, 4])
def test_router_repeat_structure(repeat):
  r = router_init.init_router("normal", D, E, np.random.default_rng(0), std=0.1, repeat=repeat)
  assert r.shape == (D, E) and r.dtype == np.float32
  for a in range(E):
    for b in range(E):
      assert np.array_equal(r[:, a], r[:, b]) == (a // repeat == b // repeat)
  assert abs(r.std() / 0.1 - 1) < 0.3
  assert not np.any(router_init.init_router("zeros", D, E, np.random.default_rng(0), repeat=repeat))
  with pytest.raises(ValueError, match="repeat=3 does not divide num_experts=8"):
    router_init.init_router("normal", D, E, np.random.default_rng(0), repeat=3)
  with pytest.raises(ValueError, match="upcycle.router_init='magic'"):
    router_init.init_router("magic", D, E, np.random.default_rng(0))


def test_kmeans_router_centroids():
  rng = np.random.default_rng(0)
  dirs = rng.normal(size=(4, D))
  truth = rng.integers(0, 4, 400)
  hidden = dirs[truth] * 5 + rng.normal(size=(400, D)) * 0.3
  r = router_init.init_router("kmeans", D, E, rng, std=0.02, repeat=2, hidden_NxD=hidden)
  cols = r[:, ::2]
  assert len({tuple(c) for c in r.T}) == 4 and np.array_equal(r[:, 0], r[:, 1])
  np.testing.assert_allclose(np.linalg.norm(cols, axis=0), 0.02 * np.sqrt(D), rtol=1e-5)
  cos = (cols / np.linalg.norm(cols, axis=0)).T @ (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).T
  assert np.all(cos.max(0) > 0.99)  # each true direction is found
  top1 = np.argmax(hidden @ cols, axis=1)  # a calibration token's top column is its cluster
  assert len({(t, c) for t, c in zip(truth, top1)}) == 4
  with pytest.raises(ValueError, match="router_init=kmeans needs"):
    router_init.init_router("kmeans", D, E, rng)


def test_hidden_router():
  rng = np.random.default_rng(0)
  dirs = rng.normal(size=(4, D))
  r = router_init.init_router("hidden", D, 4, rng, std=0.5, directions_RxD=dirs)
  np.testing.assert_allclose(r.T, dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
                             * 0.5 * np.sqrt(D), rtol=1e-5)
  labels = np.array([0, 0, 1, 2, 3, 3, -1, -1])
  hidden = rng.normal(size=(8, D))
  want = np.stack([hidden[labels == c].mean(0) for c in range(4)]) - hidden[-2:].mean(0)
  r2 = router_init.init_router("hidden", D, 8, rng, repeat=2, hidden_NxD=hidden, labels=labels)
  np.testing.assert_allclose(r2[:, ::2].T, router_init.init_router(
      "hidden", D, 4, rng, directions_RxD=want).T, rtol=1e-5)
  with pytest.raises(ValueError, match=r"none for \[2, 3\]"):
    router_init.init_router("hidden", D, 4, rng, hidden_NxD=hidden[:3], labels=labels[:3])
  with pytest.raises(ValueError, match="needs 4 prompt directions"):
    router_init.init_router("hidden", D, 4, rng, directions_RxD=dirs[:3])


def test_conditioning_warns_on_duplicated_rows():
  rng = np.random.default_rng(0)
  r = router_init.init_router("normal", D, E, rng)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert router_init.check_conditioning(r) < 10
    grouped = router_init.init_router("normal", D, E, rng, repeat=4)  # intended repeats
    assert router_init.check_conditioning(grouped, repeat=4) < 10
    assert router_init.check_conditioning(np.zeros((D, E))) == np.inf  # deliberate
  dup = r.copy()
  dup[:, 3] = dup[:, 5]
  with pytest.warns(UserWarning, match="ill-conditioned"):
    assert router_init.check_conditioning(dup, name="layer 3 router") > 1e3
  with pytest.warns(UserWarning, match="ill-conditioned"):
    router_init.check_conditioning(grouped)  # repeats not declared
  near = r.copy()
  near[:, 1] = near[:, 0] + 1e-6 * rng.normal(size=D)
  with pytest.warns(UserWarning):
    router_init.check_conditioning(near, threshold=1e3)
