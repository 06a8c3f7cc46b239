"""One metrics writer: process 0 writes JSON lines and TensorBoard events (STYLE.md #8)."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax
import numpy as np


def router_summary(stats: dict[int, dict[str, Any]], kind: str = "moe") -> dict[str, float]:
  """Flat per-layer router statistics under '<kind>/layerNN/': expert-load min/max/CV,
  and the drops, entropy and losses the layer reports (kind 'moa': attention experts)."""
  out = {}
  for layer, s in sorted(stats.items()):
    load = np.asarray(s["load_E"], np.float64)
    mean = load.mean()
    prefix = f"{kind}/layer{layer:02d}/"
    out[prefix + "load_min"] = float(load.min())
    out[prefix + "load_max"] = float(load.max())
    out[prefix + "load_cv"] = float(load.std() / mean) if mean > 0 else 0.0
    for key in ("dropped_fraction", "router_entropy", "aux_loss", "z_loss"):
      if key in s:
        out[prefix + key] = float(s[key])
  return out


def router_loads(stats: dict[int, dict[str, Any]], kind: str = "moe") -> dict[str, list[float]]:
  """Each layer's expert load (the fraction of routed assignments per expert, summing to
  1) under '<kind>/layerNN/load': vectors, written to metrics.jsonl only."""
  return {f"{kind}/layer{layer:02d}/load": [float(v) for v in np.asarray(s["load_E"])]
          for layer, s in sorted(stats.items())}


def read(workdir: str) -> list[dict[str, Any]]:
  """The rows of workdir/metrics.jsonl, one per logged step (a torn last line is skipped)."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def curve(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps_S, values_S) of the rows that logged `key` (a scalar, or a vector: [S, n])."""
  kept = [r for r in rows if r.get(key) is not None]
  return (np.array([r["step"] for r in kept], np.int64),
          np.array([r[key] for r in kept], np.float64))


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch (~2 s per binary start).

  tensorboardX imports torch only to accept torch tensors; we write Python floats. If
  torch is already loaded (a notebook, the tests), it is used as is.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _keep_rows_through(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without its rows after `step` (and any torn last line)."""
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if row.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


class MetricWriter:
  """Writes scalars to workdir/metrics.jsonl and TensorBoard; a no-op off process 0."""

  def __init__(self, workdir: str, enabled: bool | None = None, resumed_at: int = 0):
    """`resumed_at`: the step a resumed run restarts from; rows logged after it by the
    interrupted run are dropped, since the resumed run logs those steps again."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resumed_at and os.path.exists(path):
        _keep_rows_through(path, resumed_at)
      self._jsonl = open(path, "a")
      self._tb = _summary_writer()(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict[str, float],
            vectors: dict[str, list[float]] | None = None) -> None:
    """One row: `scalars` to metrics.jsonl and TensorBoard, `vectors` (per-expert loads)
    to metrics.jsonl only."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    row = {"step": step, **{k: v if math.isfinite(v) else None for k, v in clean.items()}}
    row.update({k: [x if math.isfinite(x) else None for x in map(float, v)]
                for k, v in (vectors or {}).items()})
    self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
