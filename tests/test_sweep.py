"""Sweep binary: runs each override set in its own directory, writes CSV, markdown and a
plot, and skips finished runs when started again."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _sweep(workdir):
  return subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config=configs/sweep_experts.py:runlocal",
       f"--workdir={workdir}", "--config.init=scratch", "--config.layers=all",
       "--config.loop.steps=3", "--config.loop.seq_len=32", "--config.data.max_docs=10",
       "--config.loop.eval_batches=1", "--config.optim.total_steps=3"],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_sweep_experts_runlocal(tmp_path):
  r = _sweep(tmp_path)
  assert r.returncode == 0, r.stderr
  runs = sorted(d for d in os.listdir(tmp_path) if d.startswith("upcycle"))
  assert runs == ["upcycle.method=copy,upcycle.num_experts=2,upcycle.top_k=2",
                  "upcycle.method=copy,upcycle.num_experts=4,upcycle.top_k=2",
                  "upcycle.method=none"]
  csv = (tmp_path / "results.csv").read_text().splitlines()
  assert csv[0].startswith("upcycle.method,") and len(csv) == 4
  assert "eval_loss" in (tmp_path / "results.md").read_text()
  pngs = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
  assert pngs and all((tmp_path / p).stat().st_size > 1000 for p in pngs)
  again = _sweep(tmp_path)
  assert again.returncode == 0 and again.stdout.count("skip (finished)") == 3
