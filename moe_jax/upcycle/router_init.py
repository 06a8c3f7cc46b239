"""Router initialisation: normal, zeros, k-means of calibration hidden states, or
mergekit-style "hidden" prompt directions. Routers are [D, E]; column r is repeated
`repeat` times so experts r*repeat .. (r+1)*repeat-1 share it (virtual groups)."""
from __future__ import annotations

import warnings

import numpy as np

KINDS = ("normal", "zeros", "kmeans", "hidden")


def _repeat(cols_DxR: np.ndarray, repeat: int) -> np.ndarray:
  return np.repeat(cols_DxR, repeat, axis=1).astype(np.float32)


def kmeans(points_NxD: np.ndarray, k: int, rng: np.random.Generator, iters: int = 25) -> np.ndarray:
  """Lloyd's k-means with k-means++ seeding; returns centroids [k, D]."""
  n = points_NxD.shape[0]
  if n < k:
    raise ValueError(f"router_init=kmeans: {n} calibration vectors for {k} clusters")
  centers = [points_NxD[rng.integers(n)]]
  for _ in range(1, k):
    d2 = np.min([((points_NxD - c) ** 2).sum(-1) for c in centers], axis=0)
    centers.append(points_NxD[rng.choice(n, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(n)])
  centers = np.stack(centers)
  for _ in range(iters):
    labels = np.argmin(((points_NxD[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    for c in range(k):
      if np.any(labels == c):
        centers[c] = points_NxD[labels == c].mean(0)
  return centers


def _unit_columns(rows_RxD: np.ndarray, std: float) -> np.ndarray:
  """Rows normalised to the norm a normal(std) column would have, as [D, R] columns."""
  d = rows_RxD.shape[1]
  norm = np.maximum(np.linalg.norm(rows_RxD, axis=1, keepdims=True), 1e-12)
  return (rows_RxD / norm * std * np.sqrt(d)).T


def init_router(kind: str, d_model: int, num_experts: int, rng: np.random.Generator, *,
                std: float = 0.02, repeat: int = 1, hidden_NxD: np.ndarray | None = None,
                directions_RxD: np.ndarray | None = None) -> np.ndarray:
  """A [D, E] router. `hidden_NxD`: calibration inputs of this layer's FFN (kmeans);
  `directions_RxD`: one direction per router column (hidden), e.g. positive minus
  negative prompt states."""
  r = num_experts // repeat
  if kind == "normal":
    cols = rng.normal(0.0, std, (d_model, r))
  elif kind == "zeros":
    cols = np.zeros((d_model, r))
  elif kind == "kmeans":
    if hidden_NxD is None:
      raise ValueError("router_init=kmeans needs calibration hidden states")
    x = hidden_NxD / np.maximum(np.linalg.norm(hidden_NxD, axis=1, keepdims=True), 1e-12)
    cols = _unit_columns(kmeans(x, r, rng), std)
  elif kind == "hidden":
    if directions_RxD is None or directions_RxD.shape[0] != r:
      raise ValueError(f"router_init=hidden needs {r} prompt directions")
    cols = _unit_columns(directions_RxD, std)
  else:
    raise ValueError(f"upcycle.router_init={kind!r}: expected one of {KINDS}")
  return _repeat(cols, repeat)


def check_conditioning(router_DxE: np.ndarray, repeat: int = 1, threshold: float = 1e3,
                       name: str = "router") -> float:
  """Condition number of the distinct router columns; warns when ill-conditioned."""
  cols = router_DxE[:, ::repeat].astype(np.float64)
  if not np.any(cols):
    return float("inf")  # a zero router is deliberate (uniform routing)
  s = np.linalg.svd(cols, compute_uv=False)
  cond = float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
  if cond > threshold:
    warnings.warn(f"{name}: router columns are ill-conditioned (condition number {cond:.3g}); "
                  "experts may be indistinguishable to the router", stacklevel=2)
  return cond
