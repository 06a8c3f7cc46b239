"""Sweeps: a config module's `sweep()` yields overrides; each run gets its own directory,
finished runs are skipped on restart, and the results go to CSV, markdown and PNG.

Runs can be chained: an override set may carry a `name` (its directory; otherwise the
overrides spell it) and `init: "run:<name>"`, which starts it from that earlier run's
final checkpoint. A merge (upcycle.method=merge|bam) lists several, comma-separated:
`init: "run:a,run:b"`. The sweep runs each run after the ones it starts from.
"""
from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections

from moe_jax import locks, plotting


RUN_PREFIX = "run:"
NAME = "name"


def run_name(overrides: dict[str, Any]) -> str:
  if overrides.get(NAME):
    return str(overrides[NAME])
  return ",".join(f"{k}={v}" for k, v in overrides.items()).replace("/", "_") or "base"


def _inits(overrides: dict[str, Any]) -> list[str]:
  init = overrides.get("init")
  return init.split(",") if isinstance(init, str) else []


def run_of(init: str) -> str | None:
  """The run an `init` item names (`run:<name>` -> name), None for a checkpoint path."""
  return init[len(RUN_PREFIX):] if init.startswith(RUN_PREFIX) else None


def parents_of(overrides: dict[str, Any]) -> list[str]:
  """The runs of this sweep that a run starts from (its `init`'s `run:<name>` items)."""
  return [run_of(i) for i in _inits(overrides) if run_of(i) is not None]


def order(sweep: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """The override sets with every run after the runs it starts from (else as given);
  one-line errors for duplicate names, unknown parents and cycles."""
  by_name: dict[str, dict[str, Any]] = {}
  for o in sweep:
    if run_name(o) in by_name:
      raise ValueError(f"sweep: two runs named {run_name(o)!r}")
    by_name[run_name(o)] = o
  out: list[dict[str, Any]] = []

  def visit(name: str, chain: tuple[str, ...]) -> None:
    if any(run_name(o) == name for o in out):
      return
    if name in chain:
      raise ValueError(f"sweep: runs {' -> '.join(chain + (name,))} form a cycle")
    for parent in parents_of(by_name[name]):
      if parent not in by_name:
        raise ValueError(f"sweep run {name!r}: init={RUN_PREFIX}{parent} names no run of this "
                         f"sweep (runs: {sorted(by_name)})")
      visit(parent, chain + (name,))
    out.append(by_name[name])

  for name in by_name:
    visit(name, ())
  return out


def resolve(overrides: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Config overrides of one run: without its name, each `run:<name>` of `init` as a
  directory."""
  out = {k: v for k, v in overrides.items() if k != NAME}
  if parents_of(out):
    root = os.path.abspath(workdir)
    out["init"] = ",".join(i if run_of(i) is None else os.path.join(root, run_of(i))
                           for i in _inits(out))
  return out


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides; an unknown key is a one-line error."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = config
    for part in [node, *path][:-1]:
      if part not in target:
        raise ValueError(f"sweep override {key!r}: unknown config key {part!r}")
      target = target[part]
    if ([node, *path][-1]) not in target:
      raise ValueError(f"sweep override {key!r}: unknown config key")
    target[[node, *path][-1]] = value
  return config


def run_sweep(base: ml_collections.ConfigDict, sweep: Iterable[dict[str, Any]], workdir: str,
              train_fn: Callable, poll_s: float = 30.0) -> list[dict[str, Any]]:
  """Runs every override set not finished yet; returns one row per run. Several processes
  may share a sweep (one per core or host): a run another process is training
  (locks.Busy) is passed over, and so is a run whose parent has not finished; when only
  such runs are left, this process waits (`poll_s`) for them to finish or free up."""
  runs_ = order(sweep)
  pending = list(runs_)
  while pending:
    started = _run_next(base, pending, workdir, train_fn)
    if pending and not started:
      time.sleep(poll_s)
  return [_row(o, workdir) for o in runs_]


def run_dir(name: str, workdir: str) -> str:
  """A run's directory; normalised, as `../x` under a workdir not made yet must resolve."""
  return os.path.normpath(os.path.join(workdir, name))


def final_path(path: str) -> str:
  """Where a run in directory `path` leaves its record when it finishes (runs.train_model
  writes it; a sweep takes a run that has one as done)."""
  return os.path.join(path, "final.json")


def read_final(path: str) -> dict[str, Any]:
  """The record a finished run left in its directory `path` (final_path)."""
  with open(final_path(path)) as f:
    return json.load(f)


def _finished(name: str, workdir: str) -> bool:
  return os.path.exists(final_path(run_dir(name, workdir)))


def _run_next(base, pending: list[dict[str, Any]], workdir: str, train_fn: Callable) -> bool:
  """Takes the finished runs off `pending` and trains the first runnable one (then takes it
  off); True if it trained one."""
  for overrides in list(pending):
    name = run_name(overrides)
    if _finished(name, workdir):
      print(f"skip (finished): {name}")
      pending.remove(overrides)
    elif all(_finished(p, workdir) for p in parents_of(overrides)):
      print(f"run: {name}")
      try:
        train_fn(apply(base, resolve(overrides, workdir)), run_dir(name, workdir))
      except locks.Busy as e:
        print(f"busy, passed over: {e}")
        continue
      pending.remove(overrides)
      return True
  return False


def _row(overrides: dict[str, Any], workdir: str) -> dict[str, Any]:
  name = run_name(overrides)
  result = read_final(run_dir(name, workdir))
  return {**overrides, "eval_loss": result.get("eval_loss"), "loss": result.get("loss"),
          "run": name}


def write_results(rows: list[dict[str, Any]], workdir: str, title: str) -> list[str]:
  """results.csv, results.md and one PNG per swept key (final eval loss vs its value)."""
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, keys)
    w.writeheader()
    w.writerows(rows)
  lines = [f"# {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return _plots(rows, keys, workdir, title)


def _fmt(v) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def _plots(rows, keys, workdir, title) -> list[str]:
  swept = [k for k in keys if k not in ("eval_loss", "loss", "run", NAME)
           and len({str(r.get(k)) for r in rows}) > 1]
  paths = []
  for key in swept or ["run"]:
    fig, ax = plotting.subplots(figsize=(6, 4))
    labels = [str(r.get(key)) for r in rows]
    ax.plot(range(len(rows)), [r["eval_loss"] for r in rows], "o-")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(key)
    ax.set_ylabel("final eval loss")
    ax.set_title(title)
    fig.tight_layout()
    path = os.path.join(workdir, f"eval_loss_vs_{key.replace('.', '_')}.png")
    fig.savefig(path, dpi=100)
    paths.append(path)
  return paths
