"""How far upcycled (or trained) parameters moved from the dense base they started from.

cosine: of the flattened arrays; rel_l2 = ||param - base|| / ||base|| (0 when both are
zero, inf when only the base is). Float64 accumulation throughout.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _sums(a: np.ndarray, b: np.ndarray,
          chunk: int = 1 << 16) -> tuple[float, float, float, float]:
  """(<a, b>, ||a||^2, ||b||^2, ||a - b||^2) of the flattened arrays, in float64 blocks
  small enough (512 KiB) to be reused by the allocator rather than mapped afresh."""
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  ab = aa = bb = dd = 0.0
  for s in range(0, a.size, chunk):
    x, y = a[s:s + chunk].astype(np.float64), b[s:s + chunk].astype(np.float64)
    ab, aa, bb = ab + float(x @ y), aa + float(x @ x), bb + float(y @ y)
    dd += float((x - y) @ (x - y))
  return ab, aa, bb, dd


def to_base(param: np.ndarray, base: np.ndarray) -> dict:
  """dict(cosine, rel_l2) of one array against the same-shaped base array."""
  param, base = np.asarray(param), np.asarray(base)
  if param.shape != base.shape:
    raise ValueError(f"param shape {param.shape} != base shape {base.shape}")
  ab, aa, bb, diff2 = _sums(param, base)
  cos = float(np.clip(ab / np.sqrt(aa * bb), -1.0, 1.0)) if aa > 0 and bb > 0 else 0.0
  if bb > 0:
    rel = float(np.sqrt(diff2 / bb))
  else:
    rel = 0.0 if aa == 0 else float("inf")
  return dict(cosine=cos, rel_l2=rel)


def experts_to_base(w_ExAxB: np.ndarray, base: np.ndarray) -> dict:
  """dict(cosine=[E], rel_l2=[E]): each expert against the base.

  base is one [A, B] matrix (the dense FFN matrix, for copy/drop/noise experts) or an
  [E, A, B] stack of per-expert references (the matching shards for virtual-group or
  partition experts)."""
  w_ExAxB, base = np.asarray(w_ExAxB), np.asarray(base)
  per = [to_base(w_ExAxB[e], base if base.ndim == w_ExAxB.ndim - 1 else base[e])
         for e in range(w_ExAxB.shape[0])]
  return {k: np.array([p[k] for p in per]) for k in ("cosine", "rel_l2")}


def group_to_base(params: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict:
  """{name: distance} for every name in both: to_base for same-shaped arrays,
  experts_to_base when the param has one more (leading expert) axis than the base."""
  out = {}
  for name in params:
    if name not in base:
      continue
    p, b = np.asarray(params[name]), np.asarray(base[name])
    if p.shape == b.shape:
      out[name] = to_base(p, b)
    elif p.ndim == b.ndim + 1 and p.shape[1:] == b.shape:
      out[name] = experts_to_base(p, b)
    else:
      raise ValueError(f"{name}: param shape {p.shape} does not match base shape {b.shape}")
  return out
