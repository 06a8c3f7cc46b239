"""Sweep binary: runs each override set in its own directory, writes CSV, markdown and a
plot, and skips finished runs when started again."""
import json
import os
import subprocess
import sys
import threading
import time

import ml_collections
import subproc
from configs import sweep_experts
from moe_jax import locks, runs, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = subproc.env()
OVERRIDES = {"init": "scratch", "layers": "all", "scratch.n_layers": 1, "loop.steps": 3,
             "loop.seq_len": 32,
             "data.max_docs": 10, "loop.eval_batches": 1, "optim.total_steps": 3}


def _sweep(workdir):
  return subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config=configs/sweep_experts.py:runlocal",
       f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_sweep_experts_runlocal(tmp_path):
  """The runs in process (the function the binary calls), then the binary: every run
  finished is skipped, and the results are written from their final.json files."""
  base = sweep.apply(sweep_experts.get_config("runlocal"), OVERRIDES)
  base.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  rows = sweep.run_sweep(base, sweep_experts.sweep("runlocal"), str(tmp_path), runs.train)
  assert len(rows) == 3 and all(r["eval_loss"] > 0 for r in rows)
  names = sorted(d for d in os.listdir(tmp_path) if d.startswith("upcycle"))
  assert names == ["upcycle.method=copy,upcycle.num_experts=2,upcycle.top_k=2",
                   "upcycle.method=copy,upcycle.num_experts=4,upcycle.top_k=2",
                   "upcycle.method=none"]
  again = _sweep(tmp_path)
  assert again.returncode == 0 and again.stdout.count("skip (finished)") == 3, again.stderr
  csv = (tmp_path / "results.csv").read_text().splitlines()
  assert csv[0].startswith("upcycle.method,") and len(csv) == 4
  assert "eval_loss" in (tmp_path / "results.md").read_text()
  pngs = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
  assert pngs and all((tmp_path / p).stat().st_size > 1000 for p in pngs)


def test_result_figures_leave_the_callers_pyplot_alone(tmp_path):
  """The library draws on pyplot-free Figures (moe_jax/plotting.py): a notebook's backend
  and its open figures are untouched by a sweep's (or an analysis's) PNGs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("pdf")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [{"optim.lr": lr, "eval_loss": 5.0 - lr, "loss": 5.0, "run": f"lr={lr}"}
          for lr in (0.1, 0.2)]
  paths = sweep.write_results(rows, str(tmp_path), "lr")
  assert [os.path.basename(p) for p in paths] == ["eval_loss_vs_optim_lr.png"]
  assert os.path.getsize(paths[0]) > 1000
  assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == []


def test_processes_sharing_a_sweep_pass_over_busy_runs_and_wait_for_parents(tmp_path):
  """Another worker holds run b's lock and finishes it later: this process trains a and
  c meanwhile, never b, and trains d (which starts from b) only after b has finished."""
  trained = []

  def fake_train(config, run_dir):
    with locks.hold(run_dir):
      if config.init != "scratch":
        assert os.path.exists(os.path.join(config.init, "final.json")), config.init
      trained.append(os.path.basename(run_dir))
      os.makedirs(run_dir, exist_ok=True)
      with open(os.path.join(run_dir, "final.json"), "w") as f:
        json.dump({"eval_loss": 1.0, "loss": 2.0}, f)

  other_has_b, release_b = threading.Event(), threading.Event()

  def other_worker():
    with locks.hold(str(tmp_path / "b")):
      other_has_b.set()
      release_b.wait(10)
      os.makedirs(tmp_path / "b")
      (tmp_path / "b" / "final.json").write_text('{"eval_loss": 3.0, "loss": 4.0}')

  other = threading.Thread(target=other_worker)
  other.start()
  other_has_b.wait(10)
  base = ml_collections.ConfigDict({"init": "scratch"})
  runs_ = [{"name": "a"}, {"name": "b"}, {"name": "d", "init": "run:b"}, {"name": "c"}]
  start = time.time()
  threading.Timer(0.5, release_b.set).start()
  rows = sweep.run_sweep(base, runs_, str(tmp_path), fake_train, poll_s=0.1)
  other.join()
  assert trained == ["a", "c", "d"] and time.time() - start >= 0.5
  assert [r["run"] for r in rows] == ["a", "b", "d", "c"] and rows[1]["eval_loss"] == 3.0
