"""Seeded comparisons: the reproduction study's driver (experiments/study.py).

A study config module (configs/study/*.py, read by `Finding.load`) gives the base train
config (`get_config(arg)`), `arms(arg)`, a generator of named override sets (sweep.py's
format, so an arm may start from a shared run with `init: "run:<name>"`), `shared(arg)`,
the runs that all seeds share (a seed model pre-trained once), COMPARISONS, pairs of arm
names (a, b) to report as a - b, and SEEDS; for the results page also QUESTION, CLAIM
(the paper's claim, in words), EXPECTED ({(a, b): "lower" | "higher"}, the sign of a - b
the paper predicts for held-out loss), FINDING (its number), TITLE and AXIS ((override key, label): the arms' varied
value, for plots of the final numbers against it). Every arm runs once per seed s in its
own directory `<arm>/s<s>`, with `loop.seed = s`: seed s gives every arm the same batches,
and scratch models and routers their draw. Finished runs are skipped, so an interrupted
study resumes where it stopped.

One row per run (COLUMNS) is read back from the run's files: its steps, tokens, training
FLOPs, final losses, parameter counts, throughput, training time, and, for an MoE
upcycled from a dense model, its experts' mean cosine to that model's FFN. The tables,
plots and the results page are study_report.py's.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from moe_jax import checkpoint, config_util, metrics, runs, sweep
from moe_jax.analysis import run as analysis_run
from moe_jax.analysis import static
from moe_jax.convert import load
from moe_jax.models import llama
from moe_jax.train import flops

SEED_PREFIX = "s"
DOMAINS = ("python", "english")  # data.source=stdlib+pydoc: final loss on each held-out split
COLUMNS = ("arm", "seed", "steps", "tokens", "train_flops", "eval_loss", "eval_tokens",
           "final_eval", "loss", "params", "active_params", "tokens_per_s", "train_s",
           "expert_cosine", *(f"eval_loss_{d}" for d in DOMAINS))


@dataclasses.dataclass(frozen=True)
class Finding:
  """One study config module's arms and what its results page says about them."""
  name: str                                # the module's file name: upcycling, routing, ...
  number: int                              # its place in the study (FINDING)
  title: str                               # a few words (TITLE)
  command: str                             # the command that re-runs it (docstring line 1)
  question: str
  claim: str
  arms: tuple[dict[str, Any], ...]
  shared: tuple[dict[str, Any], ...]
  comparisons: tuple[tuple[str, str], ...]
  expected: dict[tuple[str, str], str]
  axis: tuple[str, str] | None
  seeds: int
  steps: int                               # each arm's continued training (the base config's)
  ran: str = ""                            # what else the results page says of its runs (RAN)
  processes: int = 1                       # how many ran side by side, one core each (PROCESSES)

  @classmethod
  def load(cls, path: str, arg: str | None = None) -> "Finding":
    mod = config_util.load_module(path)
    expected = dict(getattr(mod, "EXPECTED", {}))
    for pair, sign in expected.items():
      if pair not in mod.COMPARISONS or sign not in ("lower", "higher"):
        raise ValueError(f"{path}: EXPECTED[{pair}]={sign!r}: expected 'lower' or 'higher' "
                         "for a pair in COMPARISONS")
    processes = getattr(mod, "PROCESSES", 1)
    if not isinstance(processes, int) or processes < 1:
      raise ValueError(f"{path}: PROCESSES={processes!r}: expected a positive integer (how "
                       "many processes shared the machine)")
    return cls(name=os.path.basename(path)[:-3], number=getattr(mod, "FINDING", 0),
               title=getattr(mod, "TITLE", os.path.basename(path)[:-3]),
               command=(mod.__doc__ or "").strip().splitlines()[0],
               question=getattr(mod, "QUESTION", ""), claim=getattr(mod, "CLAIM", ""),
               arms=tuple(mod.arms(arg)), shared=tuple(mod.shared(arg)),
               comparisons=tuple(mod.COMPARISONS), expected=expected,
               axis=getattr(mod, "AXIS", None), seeds=mod.SEEDS,
               steps=mod.get_config(arg).loop.steps, ran=getattr(mod, "RAN", ""),
               processes=processes)

  def only(self, names: list[str]) -> "Finding":
    """This finding with only the arms `names` (all for []); unknown names fail."""
    if not names:
      return self
    known = [a[sweep.NAME] for a in self.arms]
    unknown = sorted(set(names) - set(known))
    if unknown:
      raise ValueError(f"--arms: {unknown} are not arms of {self.name} (its arms: {known})")
    return dataclasses.replace(self, arms=tuple(a for a in self.arms if a[sweep.NAME] in names))

  def plan(self) -> str:
    """Its size: arms, seeds and steps per run (an arm may set its own steps)."""
    steps = sorted({a.get("loop.steps", self.steps) for a in self.arms})
    return (f"{len(self.arms)} arms x {self.seeds} seeds = {len(self.arms) * self.seeds} "
            f"runs of {' or '.join(map(str, steps))} steps")

  def axis_values(self) -> dict[str, Any]:
    """{arm: its value of AXIS's key, or its name where it sets none} ({} without AXIS)."""
    if not self.axis:
      return {}
    return {a[sweep.NAME]: a.get(self.axis[0], a[sweep.NAME]) for a in self.arms}


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
      if any(p not in shared_names for p in sweep.parents_of(run)):  # chained to arms
        run["init"] = ",".join(_seeded_init(i, shared_names, s) for i in run["init"].split(","))
      out.append(run)
  return out


def _seeded_init(init: str, shared_names: set[str], seed: int) -> str:
  """One item of an arm's `init` for seed `seed`: another arm's run becomes that arm's
  run of the same seed; a shared run or a checkpoint path stays."""
  parent = sweep.run_of(init)
  if parent is None or parent in shared_names:
    return init
  return sweep.RUN_PREFIX + run_name(parent, seed)


def run_study(base, arms, shared, seeds: int, workdir: str, train_fn: Callable) -> list[dict]:
  """Trains what is not finished yet; returns one row per arm and seed (COLUMNS). A run
  finished with another final evaluation than `base`'s loop.final_eval (an older run's
  sample of batches) is scored again from its checkpoint (runs.rescore)."""
  arms = list(arms)
  todo = seeded_runs(arms, shared, seeds)
  sweep.run_sweep(base, todo, workdir, train_fn)
  for run in todo:
    rescore_if_stale(sweep.run_dir(sweep.run_name(run), workdir), base.loop.final_eval)
  return [run_row(os.path.join(workdir, run_name(a[sweep.NAME], s)), a[sweep.NAME], s)
          for a in arms for s in range(seeds)]


def rescore_if_stale(run_dir: str, final_eval: str) -> bool:
  """Scores a finished run again when its final record was made with another
  loop.final_eval; True if it did."""
  made = sweep.read_final(run_dir).get("final_eval", "batches")  # older records: batches
  if made == final_eval:
    return False
  print(f"rescore ({made} -> {final_eval}): {run_dir}")
  runs.rescore(run_dir, final_eval)
  return True


def shared_rows(shared: Iterable[dict[str, Any]], workdir: str) -> list[dict]:
  """The rows of the shared runs (seed -1), for the compute they took."""
  rows = []
  for run in shared:
    name = sweep.run_name(run)
    rows.append(run_row(sweep.run_dir(name, workdir), os.path.basename(os.path.normpath(name)),
                        -1))
  return rows


def throughput(rows: list[dict[str, Any]], tokens_per_step: float) -> tuple[float, float]:
  """(median tokens/s, seconds of training) from a run's logged windows. The first window
  (the compile) is left out of the median but counted in the time; evaluation is not."""
  prev, tps, seconds = 0, [], 0.0
  for r in rows:
    if r.get("tokens_per_s"):
      tps.append(r["tokens_per_s"])
      seconds += (r["step"] - prev) * tokens_per_step / r["tokens_per_s"]
    prev = r["step"]
  return float(np.median(tps[1:] if len(tps) > 1 else tps)) if tps else math.nan, seconds


def expert_cosine(src: load.Source) -> float:
  """The experts' mean cosine to the FFN of the dense model they were upcycled from,
  averaged over the MoE layers; NaN for a dense run or an MoE with no dense origin."""
  ref_path = analysis_run.reference_from_provenance(src.meta) if src.is_moe else None
  if ref_path is None:
    return math.nan
  ref = load.open_source(ref_path)
  return float(np.mean([static.expert_cosine_to_base(src.layer(i), ref.layer(i))
                        for i in src.cfg.moe_layer_ids]))


def run_row(run_dir: str, arm: str, seed: int) -> dict[str, Any]:
  """One finished run's row (COLUMNS)."""
  final = sweep.read_final(run_dir)
  src = load.open_source(run_dir)
  loop = src.meta["provenance"]["train_config"]["loop"]
  steps, tokens = int(src.meta["step"]), int(src.meta["tokens_seen"])
  tps, seconds = throughput(metrics.read(run_dir), tokens / steps)
  return {"arm": arm, "seed": seed, "steps": steps, "tokens": tokens,
          "train_flops": flops.train_flops_per_token(src.cfg, loop["seq_len"]) * tokens,
          "eval_loss": final.get("eval_loss"), "eval_tokens": final.get("eval_tokens", math.nan),
          "final_eval": final.get("final_eval", "batches"),
          "loss": final.get("loss"),
          "params": checkpoint.param_count(llama.abstract(src.cfg)),
          "active_params": flops.active_params_per_token(src.cfg), "tokens_per_s": tps,
          "train_s": seconds, "expert_cosine": expert_cosine(src),
          **{f"eval_loss_{d}": final.get(f"eval_loss/{d}", math.nan) for d in DOMAINS}}


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
