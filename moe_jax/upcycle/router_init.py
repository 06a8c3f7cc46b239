"""Router initialisation: a [D, E] router drawn or computed from data, in a registry,
and a conditioning check.

Kinds (ROUTER_INITS): "normal" N(0, std); "zeros" (uniform routing, which makes
softmax_topk upcycling exact); "kmeans", spherical k-means centroids of calibration
hidden states (this layer's FFN inputs); "hidden", mergekit-style prompt directions
(positive minus negative prompt states). The data-driven kinds give unit directions
scaled to std * sqrt(D), the expected norm of a normal(std) column, so logits start at the
magnitude the "normal" kind gives and `std` keeps one meaning (router sharpness).

With repeat > 1 (virtual groups), R = E / repeat columns are made and each is repeated
`repeat` times consecutively: expert e uses column e // repeat.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np


def _sq_dists(points_NxD: np.ndarray, centers_KxD: np.ndarray,
              sq_norms_N: np.ndarray | None = None) -> np.ndarray:
  """[N, K] squared Euclidean distances, without an [N, K, D] temporary."""
  if sq_norms_N is None:
    sq_norms_N = np.einsum("nd,nd->n", points_NxD, points_NxD)
  d = sq_norms_N[:, None] - 2 * (points_NxD @ centers_KxD.T) + np.sum(centers_KxD ** 2, 1)[None]
  return np.maximum(d, 0)


def _plus_plus(points_NxD: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding: k distinct points unless fewer than k are distinct."""
  n = points_NxD.shape[0]
  chosen = [int(rng.integers(n))]
  d2 = _sq_dists(points_NxD, points_NxD[chosen])[:, 0]
  for _ in range(1, k):
    chosen.append(int(rng.choice(n, p=d2 / d2.sum())) if d2.sum() > 0 else int(rng.integers(n)))
    d2 = np.minimum(d2, _sq_dists(points_NxD, points_NxD[chosen[-1:]])[:, 0])
  return points_NxD[chosen].copy()


def _balanced_assign(cost_NxK: np.ndarray, capacity: int) -> np.ndarray:
  """Greedy assignment with at most `capacity` points per cluster: points that lose most
  by missing their best cluster (largest regret) choose first, each taking its cheapest
  cluster with room. Deterministic (stable sorts)."""
  n, k = cost_NxK.shape
  if n > capacity * k:
    raise ValueError(f"balanced assignment: {n} points exceed {k} clusters x {capacity}")
  pref = np.argsort(cost_NxK, axis=1, kind="stable")
  best = np.take_along_axis(cost_NxK, pref[:, :2], axis=1)
  regret = best[:, -1] - best[:, 0]
  labels = np.empty(n, np.int64)
  room = np.full(k, capacity)
  for i in np.argsort(-regret, kind="stable"):
    c = next(c for c in pref[i] if room[c])
    labels[i], room[c] = c, room[c] - 1
  return labels


def kmeans(points_NxD: np.ndarray, k: int, rng: np.random.Generator, *, iters: int = 25,
           capacity: int | None = None, spherical: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means with k-means++ seeding: (centroids [k, D], labels [N]).

  capacity: at most this many points per cluster (balanced assignment each step).
  spherical: assign by cosine to unit-norm centroids (for dot-product routers).
  Deterministic given `rng`; stops early when the labels stop changing."""
  x = np.asarray(points_NxD)
  x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)
  n = x.shape[0]
  if n < k:
    raise ValueError(f"kmeans: {n} points for {k} clusters")
  unit = lambda c: c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
  centers = unit(_plus_plus(x, k, rng)) if spherical else _plus_plus(x, k, rng)
  labels = np.full(n, -1)
  sq = None if spherical else np.einsum("nd,nd->n", x, x)
  for _ in range(iters):
    cost = -(x @ centers.T) if spherical else _sq_dists(x, centers, sq)
    new = np.argmin(cost, 1) if capacity is None else _balanced_assign(cost, capacity)
    if np.array_equal(new, labels):
      break
    labels = new
    counts = np.bincount(labels, minlength=k)
    sums = (labels[None] == np.arange(k)[:, None]).astype(x.dtype) @ x
    full = counts > 0  # an empty cluster keeps its centre
    centers[full] = sums[full] / counts[full, None]
    if spherical:
      centers = unit(centers)
  return centers, labels


def _scaled(rows_RxD: np.ndarray, std: float) -> np.ndarray:
  """Rows as unit directions scaled to std * sqrt(D), returned as [D, R] columns."""
  norm = np.maximum(np.linalg.norm(rows_RxD, axis=1, keepdims=True), 1e-12)
  return (rows_RxD / norm * std * np.sqrt(rows_RxD.shape[1])).T


def _normal(d_model, r, rng, std, **_):
  return rng.normal(0.0, std, (d_model, r))


def _zeros(d_model, r, rng, std, **_):
  del rng, std
  return np.zeros((d_model, r))


def _kmeans(d_model, r, rng, std, hidden_NxD=None, **_):
  """Spherical k-means of the calibration states into R clusters: a calibration token's
  top-1 router column is then its cluster."""
  if hidden_NxD is None or np.shape(hidden_NxD)[1:] != (d_model,):
    raise ValueError(f"router_init=kmeans needs calibration hidden states hidden_NxD "
                     f"[N, {d_model}]")
  x = np.asarray(hidden_NxD, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return _scaled(kmeans(x, r, rng, spherical=True)[0], std)


def _hidden(d_model, r, rng, std, hidden_NxD=None, labels=None, directions_RxD=None, **_):
  """mergekit "hidden": one direction per column, normalised. Either `directions_RxD`
  (positive minus negative prompt states, made by the caller), or `hidden_NxD` with
  `labels` [N]: column c = mean of the states labelled c minus the mean of those
  labelled -1 (negative prompts), if any."""
  del rng
  if directions_RxD is None and labels is not None and hidden_NxD is not None:
    h, lab = np.asarray(hidden_NxD, np.float64), np.asarray(labels)
    missing = [c for c in range(r) if not np.any(lab == c)]
    if missing or np.any((lab < -1) | (lab >= r)):
      raise ValueError(f"router_init=hidden: labels must cover 0..{r - 1} (-1 = negative "
                       f"prompts); none for {missing}" if missing else
                       f"router_init=hidden: labels outside -1..{r - 1}")
    neg = h[lab == -1].mean(0) if np.any(lab == -1) else 0.0
    directions_RxD = np.stack([h[lab == c].mean(0) for c in range(r)]) - neg
  if directions_RxD is None or np.shape(directions_RxD) != (r, d_model):
    raise ValueError(f"router_init=hidden needs {r} prompt directions [{r}, {d_model}] "
                     "(directions_RxD, or hidden_NxD with labels)")
  return _scaled(np.asarray(directions_RxD, np.float64), std)


ROUTER_INITS: dict[str, Callable[..., np.ndarray]] = {
    "normal": _normal, "zeros": _zeros, "kmeans": _kmeans, "hidden": _hidden}


def init_router(kind: str, d_model: int, num_experts: int, rng: np.random.Generator, *,
                std: float = 0.02, repeat: int = 1, hidden_NxD: np.ndarray | None = None,
                labels: np.ndarray | None = None,
                directions_RxD: np.ndarray | None = None) -> np.ndarray:
  """A float32 [D, E] router of `kind` (see the module docstring): R = E / repeat
  columns, each repeated `repeat` times. hidden_NxD: calibration FFN inputs (kmeans) or
  prompt states with `labels` (hidden); directions_RxD: per-column directions (hidden)."""
  if kind not in ROUTER_INITS:
    raise ValueError(f"upcycle.router_init={kind!r}: expected one of {list(ROUTER_INITS)}")
  if repeat < 1 or num_experts % repeat:
    raise ValueError(f"router_init: repeat={repeat} does not divide num_experts={num_experts}")
  cols_DxR = ROUTER_INITS[kind](d_model, num_experts // repeat, rng, std, hidden_NxD=hidden_NxD,
                                labels=labels, directions_RxD=directions_RxD)
  return np.repeat(cols_DxR, repeat, axis=1).astype(np.float32)


def check_conditioning(router_DxE: np.ndarray, repeat: int = 1, threshold: float = 1e3,
                       name: str = "router") -> float:
  """Condition number of the distinct router columns (every `repeat`-th), each scaled to
  unit norm so that it measures how close the directions are to dependent, not their
  lengths; warns above `threshold` (duplicated or nearly dependent columns: the router
  cannot tell those experts apart). A zero router is deliberate: inf, no warning."""
  cols = np.asarray(router_DxE, np.float64)[:, ::repeat]
  if not np.any(cols):
    return float("inf")
  cols = cols / np.maximum(np.linalg.norm(cols, axis=0, keepdims=True), 1e-300)
  s = np.linalg.svd(cols, compute_uv=False)
  cond = float(s[0] / s[-1]) if s[-1] > s[0] * 1e-15 else float("inf")
  if cond > threshold:
    warnings.warn(f"{name}: router columns are ill-conditioned (condition number {cond:.3g}); "
                  "some experts are indistinguishable to the router", stacklevel=2)
  return cond
