"""Router vs experts: is a router column's similarity explained by its expert's weights?

Look-into-MoEs fits, per layer, router-column cosine against expert-weight cosine over
the expert pairs i < j, and reports R and R^2 (then the mean R^2 over layers).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_jax.analysis import weights


def router_cosine(router_DxE: np.ndarray) -> np.ndarray:
  """[E, E] cosine between router columns (one D-vector per expert)."""
  return weights.row_cosine(np.asarray(router_DxE).T)


def upper_pairs(cos_ExE: np.ndarray) -> np.ndarray:
  """The off-diagonal entries i < j of a square matrix, as a flat float64 vector."""
  iu = np.triu_indices(cos_ExE.shape[0], 1)
  return np.asarray(cos_ExE, np.float64)[iu]


def pearson_r(x_N: np.ndarray, y_N: np.ndarray) -> float:
  """Pearson correlation; 0 when either input is constant (or has fewer than 2 entries)."""
  dx_N, dy_N = x_N - x_N.mean(), y_N - y_N.mean()
  denom = np.sqrt(np.dot(dx_N, dx_N) * np.dot(dy_N, dy_N))
  return float(np.clip(np.dot(dx_N, dy_N) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def router_fit(router_cos_ExE: np.ndarray, weight_cos_ExE: np.ndarray) -> dict:
  """Least-squares line router_cos ~ slope * weight_cos + intercept over pairs i < j.

  weight_cos may carry a reference row/column (E+1); only the experts' E x E block is
  used. Returns slope, intercept, r (Pearson) and r2 = r^2; constant weight cosines give
  slope 0, intercept = mean router cosine and r = 0."""
  e = router_cos_ExE.shape[0]
  y_N = upper_pairs(router_cos_ExE)
  x_N = upper_pairs(np.asarray(weight_cos_ExE)[:e, :e])
  if y_N.size == 0:
    return dict(slope=0.0, intercept=0.0, r=0.0, r2=0.0, n=0)
  dx_N = x_N - x_N.mean()
  sxx = float(np.dot(dx_N, dx_N))
  slope = float(np.dot(dx_N, y_N - y_N.mean()) / sxx) if sxx > 0 else 0.0
  r = pearson_r(x_N, y_N)
  return dict(slope=slope, intercept=float(y_N.mean() - slope * x_N.mean()), r=r, r2=r * r,
              n=int(y_N.size))


def layer_fits(router_cos_LxExE: Sequence[np.ndarray],
               weight_cos_LxExE: Sequence[np.ndarray]) -> dict:
  """router_fit per layer plus the mean R^2 over layers (the paper's summary number)."""
  fits = [router_fit(rc, wc) for rc, wc in zip(router_cos_LxExE, weight_cos_LxExE, strict=True)]
  return dict(fits=fits, mean_r2=float(np.mean([f["r2"] for f in fits])) if fits else float("nan"))
