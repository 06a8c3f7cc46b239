"""What the experiment binaries run: importable from a notebook, one function per job."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from absl import logging

from moe_jax import checkpoint
from moe_jax import evaluate as eval_lib
from moe_jax.convert import load
from moe_jax.data import corpus

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def main_guard(fn: Callable, *args, **kwargs):
  """Runs `fn`; a user error becomes one line on stderr and exit status 1."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def eval_text(eval_file: str) -> tuple[str, str]:
  """(text, name) for the configured eval file, '' meaning the embedded pydoc text."""
  if eval_file:
    return corpus.read_text_file(eval_file), eval_file
  return corpus.embedded_eval_text(), "pydoc_data.topics"


def check_seq_len(seq_len: int, max_seq_len: int, key: str = "config.seq_len") -> None:
  if seq_len < 2:
    raise ValueError(f"{key}={seq_len}: expected at least 2")
  if seq_len > max_seq_len:
    raise ValueError(f"{key}={seq_len}: above the model's limit of {max_seq_len} positions")


def evaluate(config, workdir: str) -> dict:
  """Perplexity (and optional completion) of `config.checkpoint`; writes workdir/eval.json."""
  text, text_name = eval_text(config.eval_file)
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size={config.batch_size}: expected a positive integer")
  cfg = load.read_config(config.checkpoint)
  check_seq_len(config.seq_len, cfg.max_seq_len)
  tok = load.load_tokenizer(config.checkpoint)
  windows = eval_lib.make_windows(tok.encode(text), config.seq_len, config.max_windows, text_name)
  model, _ = load.load_model(config.checkpoint, dtype=config.dtype)
  logging.info("evaluating %d windows of %d tokens", len(windows), config.seq_len)
  t0 = time.time()
  result = eval_lib.perplexity(model, windows, config.batch_size)
  result.update(checkpoint=config.checkpoint or "embedded:SmolLM2-135M-Instruct",
                eval_file=text_name, seq_len=config.seq_len, windows=len(windows),
                seconds=round(time.time() - t0, 2))
  if config.prompt:
    ids = eval_lib.generate(model, tok.encode(config.prompt), config.max_new_tokens, tok.eos_id)
    result["completion"] = tok.decode(ids)
    print(f"prompt: {config.prompt!r}\ncompletion: {result['completion']!r}")
  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_json_atomic(os.path.join(workdir, "eval.json"), result)
  print(f"eval_loss={result['eval_loss']:.6f} ppl={result['ppl']:.4f} tokens={result['tokens']}")
  return result


def demo(workdir: str, max_windows: int = 32) -> dict:
  """The main job at this stage: the embedded model's perplexity and a completion."""
  from configs import evaluate as eval_config  # pylint: disable=g-import-not-at-top
  config = eval_config.get_config()
  config.max_windows = max_windows
  config.prompt = "The three most useful Python built-in functions are"
  print("moe_jax demo: SmolLM2-135M-Instruct (embedded GGUF) on pydoc_data.topics")
  return evaluate(config, os.path.join(workdir, "dense_eval"))
