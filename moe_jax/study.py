"""Seeded comparisons: the reproduction study's driver (experiments/study.py).

A study config module (configs/study/*.py) gives the base train config (`get_config(arg)`),
`arms(arg)`, a generator of named override sets (sweep.py's format, so an arm may start
from a shared run with `init: "run:<name>"`), `shared(arg)`, the runs that all seeds share
(a seed model pre-trained once), and COMPARISONS, pairs of arm names (a, b) to report as
a - b. Every arm runs once per seed s in its own directory `<arm>/s<s>`, with `loop.seed =
s`: seed s gives every arm the same batches, and scratch models and routers their draw.
Finished runs are skipped, so an interrupted study resumes where it stopped.

The results are computed from the runs' files: results.csv (one row per arm and seed),
results.md (mean ± std over seeds; for each comparison the mean paired difference and its
standard error), and held-out loss against training tokens and training FLOPs (mean over
seeds, with a min-max band).
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from moe_jax import metrics, plotting, sweep
from moe_jax.convert import load
from moe_jax.train import flops

SEED_PREFIX = "s"
COLUMNS = ("arm", "seed", "steps", "tokens", "train_flops", "eval_loss", "loss")


def run_name(arm: str, seed: int) -> str:
  """The directory of an arm's run for one seed, below the finding's workdir."""
  return f"{arm}/{SEED_PREFIX}{seed}"


def seeded_runs(arms: Iterable[dict[str, Any]], shared: Iterable[dict[str, Any]],
                seeds: int) -> list[dict[str, Any]]:
  """Every run of the study: the shared runs once, each arm once per seed."""
  if seeds < 1:
    raise ValueError(f"study seeds={seeds}: expected at least 1")
  out = [dict(o) for o in shared]
  shared_names = {sweep.run_name(o) for o in out}
  for arm in arms:
    if not arm.get(sweep.NAME):
      raise ValueError(f"study arm {arm}: every arm needs a 'name'")
    if "loop.seed" in arm:
      raise ValueError(f"study arm {arm['name']!r}: loop.seed is set per seed by the study")
    for s in range(seeds):
      run = {**arm, sweep.NAME: run_name(arm[sweep.NAME], s), "loop.seed": s}
      parent = sweep.parent_of(run)
      if parent is not None and parent not in shared_names:  # an arm chained to an arm
        run["init"] = sweep.RUN_PREFIX + run_name(parent, s)
      out.append(run)
  return out


def run_study(base, arms, shared, seeds: int, workdir: str, train_fn: Callable) -> list[dict]:
  """Trains what is not finished yet; returns one row per arm and seed (COLUMNS)."""
  arms = list(arms)
  sweep.run_sweep(base, seeded_runs(arms, shared, seeds), workdir, train_fn)
  return [run_row(os.path.join(workdir, run_name(a[sweep.NAME], s)), a[sweep.NAME], s)
          for a in arms for s in range(seeds)]


def run_row(run_dir: str, arm: str, seed: int) -> dict[str, Any]:
  """One finished run's row: its steps, training tokens and FLOPs, and final losses."""
  with open(os.path.join(run_dir, "final.json")) as f:
    final = json.load(f)
  src = load.open_source(run_dir)
  loop = src.meta["provenance"]["train_config"]["loop"]
  steps, tokens = int(src.meta["step"]), int(src.meta["tokens_seen"])
  per_token = flops.train_flops_per_token(src.cfg, loop["seq_len"])
  return {"arm": arm, "seed": seed, "steps": steps, "tokens": tokens,
          "train_flops": per_token * tokens, "eval_loss": final.get("eval_loss"),
          "loss": final.get("loss")}


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_difference(rows: list[dict], a: str, b: str, key: str = "eval_loss") -> dict:
  """Mean of (a - b) over the seeds both arms ran, and its standard error std / sqrt(n)."""
  by = {(r["arm"], r["seed"]): r[key] for r in rows}
  seeds = sorted({s for (arm, s) in by if arm == a} & {s for (arm, s) in by if arm == b})
  if not seeds:
    raise ValueError(f"study comparison {a} - {b}: no seed ran both arms")
  d = [by[(a, s)] - by[(b, s)] for s in seeds]
  mean, std = mean_std(d)
  return {"a": a, "b": b, "n": len(d), "diff": mean,
          "se": std / math.sqrt(len(d)) if len(d) > 1 else float("nan")}


def write_results(rows: list[dict], comparisons: Iterable[tuple[str, str]], workdir: str,
                  title: str) -> list[str]:
  """results.csv, results.md, and the loss plots of the runs below `workdir`."""
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, COLUMNS)
    w.writeheader()
    w.writerows(rows)
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  lines = [f"# {title}", "", "| arm | seeds | held-out loss (mean ± std) | training loss | "
           "tokens | training FLOPs |", "|---|---|---|---|---|---|"]
  for arm in arms:
    mine = [r for r in rows if r["arm"] == arm]
    ev, tr = mean_std([r["eval_loss"] for r in mine]), mean_std([r["loss"] for r in mine])
    lines.append(f"| {arm} | {len(mine)} | {ev[0]:.4f} ± {ev[1]:.4f} | {tr[0]:.4f} ± "
                 f"{tr[1]:.4f} | {mine[0]['tokens']:.3g} | {mine[0]['train_flops']:.3g} |")
  lines += ["", "| comparison | seeds | held-out loss difference (mean ± SE) |", "|---|---|---|"]
  for a, b in comparisons:
    d = paired_difference(rows, a, b)
    lines.append(f"| {a} - {b} | {d['n']} | {d['diff']:+.4f} ± {d['se']:.2g} |")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return plot_curves(rows, workdir, title)


def _mean_curve(run_dirs: list[str]) -> tuple[np.ndarray, ...]:
  """(steps, mean, min, max) of the held-out loss over the runs, at the steps all logged."""
  curves = [metrics.curve(metrics.read(d), "eval_loss") for d in run_dirs]
  steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
  ys = np.array([[dict(zip(s.tolist(), v))[t] for t in steps] for s, v in curves])
  return np.asarray(steps), ys.mean(0), ys.min(0), ys.max(0)


def plot_curves(rows: list[dict], workdir: str, title: str) -> list[str]:
  """Held-out loss against training tokens and against training FLOPs, one curve per arm
  (mean over its seeds) with a band from the lowest to the highest seed."""
  by_arm: dict[str, list[dict]] = {}
  for r in rows:
    by_arm.setdefault(r["arm"], []).append(r)
  curves = {arm: _mean_curve([os.path.join(workdir, run_name(arm, r["seed"])) for r in mine])
            for arm, mine in by_arm.items()}
  paths = []
  for key, label in (("tokens", "training tokens"), ("train_flops", "training FLOPs")):
    fig, ax = plotting.subplots(figsize=(7, 4.2), layout="constrained")
    for arm, (steps, mean, lo, hi) in curves.items():
      first = by_arm[arm][0]
      x = steps * (first[key] / first["steps"])  # the same per step for every seed
      ax.plot(x, mean, "o-", ms=3, label=f"{arm} ({len(by_arm[arm])} seeds)")
      ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set(xlabel=label, ylabel="held-out loss", title=title)
    ax.legend(fontsize=8)
    path = os.path.join(workdir, f"loss_vs_{key}.png")
    fig.savefig(path, dpi=110)
    paths.append(path)
  return paths


def write_curve(run_dir: str, out_dir: str, name: str) -> list[str]:
  """One run's loss curve as results to commit (the checkpoints are not): <name>.csv
  (step, tokens, training and held-out loss) and <name>.png."""
  rows = metrics.read(run_dir)
  tokens_per_step = run_row(run_dir, name, 0)["tokens"] / max(r["step"] for r in rows)
  os.makedirs(out_dir, exist_ok=True)
  csv_path, png_path = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("csv", "png"))
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step", "tokens", "loss", "eval_loss"])
    for r in rows:
      w.writerow([r["step"], int(r["step"] * tokens_per_step), r.get("loss"), r.get("eval_loss")])
  fig, ax = plotting.subplots(figsize=(7, 4.2), layout="constrained")
  for key, style in (("loss", "-"), ("eval_loss", "o-")):
    steps, values = metrics.curve(rows, key)
    ax.plot(steps * tokens_per_step, values, style, ms=3, label=key.replace("_", " "))
  ax.set(xlabel="training tokens", ylabel="loss", title=name)
  ax.legend()
  fig.savefig(png_path, dpi=110)
  return [csv_path, png_path]
