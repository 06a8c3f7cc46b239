"""experiments.evaluate: bad input exits non-zero with one line and writes nothing."""
import json
import os
import subprocess
import sys

import pytest

import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _evaluate(workdir, *extra):
  return subprocess.run([sys.executable, "-m", "experiments.evaluate",
                         "--config=configs/evaluate.py", f"--workdir={workdir}", *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def _bad_arch_dir(tmp_path):
  path = tmp_path / "hf"
  hf_models.make_model("llama").save_pretrained(str(path))
  cfg = json.loads((path / "config.json").read_text())
  cfg["model_type"] = "falcon"
  (path / "config.json").write_text(json.dumps(cfg))
  return path


@pytest.mark.parametrize("case", ["missing", "short", "arch", "truncated"])
def test_bad_input(tmp_path, case):
  work = tmp_path / "work"
  if case == "missing":
    args, msg = ["--config.checkpoint=/nope/model.gguf"], "/nope/model.gguf: checkpoint not found"
  elif case == "short":
    short = tmp_path / "short.txt"
    short.write_text("Too short for a window.")
    args, msg = [f"--config.eval_file={short}"], "tokens, shorter than one window of seq_len=512"
  elif case == "arch":
    path = _bad_arch_dir(tmp_path)
    args, msg = [f"--config.checkpoint={path}"], "model_type='falcon' is not supported"
  else:
    from moe_jax.convert import gguf
    cut = tmp_path / "cut.gguf"
    with open(gguf.embedded_gguf_path(), "rb") as f:
      cut.write_bytes(f.read(10_000_000))
    args, msg = [f"--config.checkpoint={cut}"], "truncated GGUF file"
  r = _evaluate(work, *args)
  assert r.returncode == 1, r.stderr
  assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
  named = {"short": "short.txt", "truncated": "cut.gguf"}.get(case, "")
  assert f"{named}: " in r.stderr
  assert not work.exists()


def test_eval_writes_json_and_last_line(tmp_path):
  r = _evaluate(tmp_path / "work", "--config.seq_len=64", "--config.max_windows=2")
  assert r.returncode == 0, r.stderr
  last = r.stdout.strip().splitlines()[-1]
  assert last.startswith("eval_loss=") and " ppl=" in last and last.endswith("tokens=126")
  result = json.loads((tmp_path / "work" / "eval.json").read_text())
  assert result["tokens"] == 126 and abs(float(last.split()[0].split("=")[1]) - result["eval_loss"]) < 1e-6
