"""Training binary: exact resume after SIGKILL, SIGTERM checkpointing, NaN stop, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from flax import nnx
import pytest

import subproc

from configs import train as train_config
from moe_jax import metrics, runs, sweep
from moe_jax.data import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config=configs/train.py:scratch,runlocal,lr=0.003", "--config.data.max_docs=20",
        "--config.loop.seq_len=64", "--config.loop.log_every=1", "--config.loop.ckpt_every=4",
        "--config.loop.eval_every=100", "--config.loop.eval_batches=1"]


ENV = subproc.env()  # one CPU device
# The signal and NaN paths are the loop's, not the MoE's: a dense model compiles faster
# (exact resume is checked on the MoE).
DENSE = "--config.upcycle.method=none"


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *BASE, *extra]


def _losses(workdir):
  """step -> loss, the last logged value winning (a resumed run re-logs its steps)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out[row["step"]] = row["loss"]
  return out


def _steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _wait_for_checkpoint(proc, workdir, step, timeout=300):
  t0 = time.time()
  while step not in _steps(workdir):
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() - t0 < timeout
    time.sleep(0.2)


def _parquet(path, docs):
  """`docs` as a parquet file's `text` column (what `datasets` reads)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), str(path))
  return str(path)


def test_resume_after_sigkill_is_exact(tmp_path):
  """On a local parquet file read through `datasets` (the embedded text goes through the
  same packing and grain iterator state after it is read), with gradient accumulation."""
  data = _parquet(tmp_path / "docs.parquet", corpus.stdlib_documents("train")[:40])
  steps = ("--config.loop.steps=8", f"--config.data.source=hf:parquet:{data}",
           "--config.loop.grad_accum=2")
  ref = tmp_path / "ref"
  subprocess.run(_cmd(ref, *steps), cwd=ROOT, env=ENV, check=True, capture_output=True,
                 timeout=600)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(killed, *steps), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(proc, killed, 4)
  proc.kill()
  proc.wait()
  assert max(_steps(killed)) < 8
  subprocess.run(_cmd(killed, *steps), cwd=ROOT, env=ENV, check=True, capture_output=True,
                 timeout=600)
  want, got = _losses(ref), _losses(killed)
  assert sorted(want) == sorted(got) == list(range(1, 9))
  assert got == want  # float32 on CPU: bitwise the same losses


def test_sigterm_saves_the_current_step(tmp_path):
  work = tmp_path / "run"
  proc = subprocess.Popen(_cmd(work, "--config.loop.steps=400", DENSE), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(proc, work, 4)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  assert "stopped: SIGTERM: saved step" in proc.stderr.read()
  assert not (work / "final.json").exists()  # not finished: a sweep or study resumes it
  stopped = max(_losses(work))
  assert max(_steps(work)) == stopped and stopped < 400
  resumed = subprocess.run(_cmd(work, f"--config.loop.steps={stopped + 1}", DENSE), cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert max(_losses(work)) == stopped + 1


def test_nan_stops_keeps_the_last_good_step_and_a_resume_trains(tmp_path):
  """NaN in step 6's loss (and so its gradients): the run stops in one line, step 4 stays
  the last (finite) checkpoint, and a resume from it, at a lower LR, trains to the end."""
  work = tmp_path / "run"
  r = subprocess.run(_cmd(work, "--config.loop.steps=8", "--config.loop.inject_nan_at_step=5",
                          DENSE), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1
  assert "step 6: loss is nan; stopped, this step not saved. Last good checkpoint: 4" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  assert _steps(work) == [4]
  r = subprocess.run(_cmd(work, "--config.loop.steps=8", "--config.optim.lr=3e-4",
                          "--config.resume_allow=optim.lr", DENSE), cwd=ROOT, env=ENV,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  losses = _losses(work)
  assert sorted(losses) == list(range(1, 9)) and all(np.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("key,value,msg", [
    ("init", "/no/such/ckpt", "/no/such/ckpt: checkpoint not found"),
    ("loop.seq_len", 4096, "config.loop.seq_len=4096: above the model's limit"),
    ("optim.schedule", "linear", "optim.schedule='linear'"),
    ("loop.steps", 0, "config.loop.steps=0: expected an integer >= 1"),
    ("loop.batch_size", 0, "config.loop.batch_size=0"),
    ("loop.ckpt_every", 0, "config.loop.ckpt_every=0"),
    ("loop.log_every", 0, "config.loop.log_every=0"),
    ("loop.eval_every", 0, "config.loop.eval_every=0"),
    ("loop.keep", 0, "config.loop.keep=0"),
    ("optim.lr", float("nan"), "config.optim.lr=nan: expected a finite value > 0"),
    ("optim.lr", -1e-3, "config.optim.lr=-0.001"),
    ("optim.b1", 1.0, "config.optim.b1=1.0: expected a finite value >= 0 and < 1"),
    ("optim.clip_norm", -1.0, "config.optim.clip_norm=-1.0"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay=-0.1"),
    ("optim.decay_fraction", 1.5, "config.optim.decay_fraction=1.5"),
    ("optim.final_lr_fraction", -0.1, "config.optim.final_lr_fraction=-0.1"),
])
def test_bad_config_fails_before_compute(tmp_path, key, value, msg):
  """In process (the binary's one-line boundary is tested below and in
  test_evaluate_binary.py): one-line error, nothing written."""
  config = sweep.apply(train_config.get_config("scratch,runlocal"), {key: value})
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    runs.train(config, str(tmp_path / "run"))
  assert msg in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_datasets_sources_split_and_bad_files_are_one_line(tmp_path):
  """hf:json / hf:text read through `datasets` (first 5% held out, as for local files);
  a file without the configured field, a missing file or one that does not parse: one
  line, nothing written."""
  docs = [f"document {i} " * 5 for i in range(40)]
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
  assert corpus.hf_documents(f"json:{jsonl}", "body") == (docs[2:], docs[:2])
  assert corpus.hf_documents(f"parquet:{_parquet(tmp_path / 'p.parquet', docs)}") == \
      (docs[2:], docs[:2])
  (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n{not json\n')
  for source, field, msg in (
      (f"hf:json:{jsonl}", "text", f"data.source=hf:json:{jsonl}: no column 'text' "
                                   "(config.data.field); columns: ['body']"),
      (f"hf:json:{tmp_path}/none.jsonl", "text", "none.jsonl: file not found"),
      (f"hf:json:{tmp_path}/bad.jsonl", "body", f"data.source=hf:json:{tmp_path}/bad.jsonl: ")):
    config = sweep.apply(train_config.get_config("scratch,runlocal"),
                         {"data.source": source, "data.field": field})
    config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
      runs.train(config, str(tmp_path / "run"))
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_unknown_key_is_refused(tmp_path):
  r = subprocess.run(_cmd(tmp_path / "run", "--config.loop.stepz=3"), cwd=ROOT, env=ENV,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "stepz Did you mean steps" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_devices(tmp_path):
  env = subproc.env(devices=8)
  r = subprocess.run(_cmd(tmp_path / "run", "--config.loop.batch_size=6"), cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "config.loop.batch_size=6 is not divisible by the 8 devices" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_bfloat16_compute_trains_like_float32(tmp_path):
  """config.dtype=bfloat16: bf16 matmuls, float32 params, optimizer state and router
  (moe_jax/moe/layer.py). After 20 steps of a 2-expert MoE from scratch, the training
  loss is within 0.1% of float32's (1.8e-5 measured), and the saved params are float32."""
  losses, configs = {}, {}
  for dtype in ("float32", "bfloat16"):
    config = sweep.apply(train_config.get_config("scratch,runlocal,experts=2"),
                         {"dtype": dtype, "data.max_docs": 20, "loop.steps": 20,
                          "loop.batch_size": 2, "loop.seq_len": 32, "loop.eval_batches": 0,
                          "loop.ckpt_every": 20, "loop.log_every": 20, "optim.lr": 3e-3})
    config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    losses[dtype] = runs.train(config, str(tmp_path / dtype))["loss"]
    configs[dtype] = config
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-3)
  # Each logged step holds every MoE layer's expert load, a vector summing to 1.
  row = metrics.read(str(tmp_path / "float32"))[-1]
  loads = [row[f"moe/layer{i:02d}/load"] for i in range(2)]
  assert [len(v) for v in loads] == [2, 2] and all(sum(v) == pytest.approx(1) for v in loads)
  # A finished run trained again trains nothing, and returns and keeps its final record.
  with open(tmp_path / "float32" / "final.json") as f:
    final = json.load(f)
  assert runs.train(configs["float32"], str(tmp_path / "float32")) == final
  with open(tmp_path / "float32" / "final.json") as f:
    assert json.load(f) == final
  assert losses["bfloat16"] != losses["float32"]  # bf16 did run
  from moe_jax.convert import load  # pylint: disable=g-import-not-at-top
  params = load.open_source(str(tmp_path / "bfloat16")).model()
  assert {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(params, nnx.Param))} \
      == {"float32"}
