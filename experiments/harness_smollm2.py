"""The bundled harness task on SmolLM2 and on its 8-expert top-2 copy upcycle, run the way a
user runs them: the harness's command line and experiments.evaluate, each a process.

  python -m experiments.harness_smollm2 --limit=100 --out=docs/results/harness_smollm2.json

Function preservation says the upcycle scores every request as the dense model does, so
the accuracies must be equal; the JSON records both paths' accuracies and the largest
per-request log-likelihood difference between dense and upcycled (from --log_samples).
"""
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags

from experiments import cli
from moe_jax import checkpoint

_LIMIT = flags.DEFINE_integer("limit", 100, "Docs of pydoc_next (400 in all; 0 = all).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Requests per forward.")
_OUT = flags.DEFINE_string("out", "", "Write the figures as JSON to this path.")
TASK = "pydoc_next"


def _run(args: list[str]) -> float:
  t0 = time.time()
  r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{' '.join(args[:1])} failed: {r.stderr.strip().splitlines()[-1:]}")
  return round(time.time() - t0, 1)


def _cli(ckpt: str, out: str, limit: list[str]) -> tuple[dict, dict, float]:
  """(metrics, doc_id -> [log-likelihood per choice], seconds) from the harness CLI."""
  secs = _run(["experiments.harness", "--model", "moe_jax", "--model_args",
               f"checkpoint={ckpt}", "--batch_size", str(_BATCH.value), "--tasks", TASK,
               "--log_samples", "--output_path", out, *limit])
  with open(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]) as f:
    metrics = json.load(f)["results"][TASK]
  logliks = {}
  with open(glob.glob(f"{out}/**/samples_{TASK}_*.jsonl", recursive=True)[0]) as f:
    for line in f:
      s = json.loads(line)
      logliks[s["doc_id"]] = [float(r[0][0]) for r in s["resps"]]
  return metrics, logliks, secs


def main(argv):
  del argv
  tmp = tempfile.mkdtemp(prefix="harness_smollm2_")
  moe = os.path.join(tmp, "moe8")
  limit = ["--limit", str(_LIMIT.value)] if _LIMIT.value else []
  up_s = _run(["experiments.upcycle", "--config=configs/upcycle.py:method=copy,experts=8,topk=2",
               f"--workdir={moe}", "--config.eval_windows=1"])
  rows, logliks = {}, {}
  for name, ckpt in (("dense", ""), ("upcycled_8x_top2", moe)):
    metrics, logliks[name], secs = _cli(ckpt, os.path.join(tmp, f"cli_{name}"), limit)
    work = os.path.join(tmp, f"eval_{name}")
    eval_s = _run(["experiments.evaluate", "--config=configs/evaluate.py:runlocal",
                   f"--config.checkpoint={ckpt}", f"--config.tasks={TASK}",
                   f"--config.task_limit={_LIMIT.value}", f"--config.batch_size={_BATCH.value}",
                   f"--workdir={work}"])
    with open(os.path.join(work, "lm_eval.json")) as f:
      via_eval = json.load(f)["results"][TASK]
    rows[name] = {"cli_acc": metrics["acc,none"], "cli_acc_norm": metrics["acc_norm,none"],
                  "evaluate_acc": via_eval["acc,none"],
                  "evaluate_acc_norm": via_eval["acc_norm,none"],
                  "cli_seconds": secs, "evaluate_seconds": eval_s}
  dense, up = logliks["dense"], logliks["upcycled_8x_top2"]
  diff = max(abs(a - b) for d in dense for a, b in zip(dense[d], up[d]))
  result = {"task": TASK, "docs": len(dense), "requests": sum(len(v) for v in dense.values()),
            "models": rows, "max_abs_loglik_diff_dense_vs_upcycled": diff,
            "accuracies_equal": all(rows["dense"][k] == rows["upcycled_8x_top2"][k]
                                    for k in rows["dense"] if "acc" in k),
            "upcycle_seconds": up_s,
            "command": "python -m experiments.harness_smollm2 " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "device": jax.devices()[0].platform, "jax": jax.__version__,
            "date": datetime.date.today().isoformat()}
  print(json.dumps(result, indent=1))
  if _OUT.value:
    cli.main_guard(checkpoint.write_json_atomic, _OUT.value, result)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
