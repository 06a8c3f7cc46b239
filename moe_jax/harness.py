"""lm-evaluation-harness adapter: the `moe_jax` model of the harness's registry.

    python -m experiments.harness --model moe_jax \
        --model_args checkpoint=PATH,batch_size=8,dtype=float32 --tasks pydoc_next

is the harness's own command line (`lm_eval ...`, every flag the same) with this model
registered and moe_jax's bundled tasks (moe_jax/harness_tasks) on its include path
(`main` below): lm-eval 0.4.13 does not discover models from other packages. PATH is anything
`moe_jax.convert.load.open_source` reads ('' = the embedded SmolLM2). In Python,
`MoeJaxLM(model=..., tokenizer=...)` wraps a model already in memory and
`evaluate_tasks` runs the harness in-process (what experiments.evaluate's
`--config.tasks` does). Needs the `eval` extra.

Scores equal the harness's `hf` model on the same weights: the same encoding of each
(context, continuation) pair (TemplateLM), the same left truncation and rolling windows.
Requests are scored longest first in batches right-padded to a bucketed width; with
causal attention and dropless dispatch a pad token changes no real token's result, so
capacity dispatch (where tokens compete for expert slots) is replaced by dropless.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from moe_jax import generation, harness_tasks, runs
from moe_jax.convert import load
from moe_jax.moe import dispatch
from moe_jax.train.step import token_nll

_WIDTH_BUCKET = 32  # padded request widths are multiples of this: few compiles


@nnx.jit
def _score(model, tokens_BxL: jax.Array, targets_BxL: jax.Array):
  """log p(target) and whether the target is the argmax, at every position."""
  positions = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
  logits, _ = model(tokens_BxL, positions, jnp.ones_like(tokens_BxL), train=False)
  return -token_nll(logits, targets_BxL), jnp.argmax(logits, axis=-1) == targets_BxL


def needs_dropless(moe) -> bool:
  """Whether an MoE config scores with capacity dispatch, where tokens of a batch (pads
  included) compete for expert slots: scoring then switches to dropless."""
  return moe is not None and moe.backend in dispatch.CAPACITY_BACKENDS


def evaluation_model(src: load.Source, dtype: str = "float32", backend: str = ""):
  """`src`'s model for scoring: `backend` if given, else dropless instead of capacity."""
  backend = backend or ("dropless" if needs_dropless(src.cfg.moe) else "")
  return src.model(dtype=dtype, **runs.eval_overrides(src.cfg, {"backend": backend}))


@register_model("moe_jax")
class MoeJaxLM(TemplateLM):
  """loglikelihood, loglikelihood_rolling and generate_until for a moe_jax model."""

  def __init__(self, checkpoint: str = "", batch_size: int | str = 8, dtype: str = "float32",
               max_length: int | None = None, max_gen_toks: int = 256, backend: str = "",
               model=None, tokenizer=None, **kwargs):
    super().__init__()
    del kwargs  # the harness's own (device, ...), meaningless here
    if str(batch_size).startswith("auto"):
      raise ValueError("model_args batch_size=auto: expected a number (moe_jax does not probe "
                       "memory)")
    if model is None:
      src = load.open_source(checkpoint)
      model, tokenizer = evaluation_model(src, dtype, backend), src.tokenizer()
    self.model, self.tok = model, tokenizer
    self.batch_size = int(batch_size)
    self.max_length = int(max_length or model.cfg.max_seq_len)
    self.max_gen_toks = int(max_gen_toks)
    if self.batch_size < 1 or self.max_length < 2:
      raise ValueError(f"model_args batch_size={batch_size}, max_length={max_length}: "
                       "expected a positive batch and at least 2 positions")

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    """`--model_args` win over the command line's own (--batch_size, default 1), so that
    both `--model_args ...,batch_size=N` and `--batch_size N` work."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The tokenizer's own special tokens unless told otherwise (as the `hf` model does),
    none added to a string that already starts with the prefix token."""
    if add_special_tokens is None:
      add_special_tokens = not string.startswith(self.tok.decode([self.prefix_token_id]))
    return self.tok.tok.encode(string, add_special_tokens=add_special_tokens).ids

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(sum of log p(continuation), greedy?) per (key, context ids, continuation ids)."""
    del disable_tqdm, kwargs
    rows = []
    for _, context, continuation in requests:
      if not context or not continuation or len(continuation) > self.max_length:
        raise ValueError(f"a request of {len(context)} context and {len(continuation)} "
                         f"continuation tokens: expected both non-empty, the continuation "
                         f"at most {self.max_length}")
      rows.append((context + continuation)[-(self.max_length + 1):])
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), self.batch_size):
      batch = order[start:start + self.batch_size]
      width = min(generation.bucket(len(rows[batch[0]]) - 1, _WIDTH_BUCKET), self.max_length)
      tokens = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      for r, i in enumerate(batch):
        tokens[r, :len(rows[i]) - 1] = rows[i][:-1]
        targets[r, :len(rows[i]) - 1] = rows[i][1:]
      logp, greedy = jax.device_get(_score(self.model, jnp.asarray(tokens), jnp.asarray(targets)))
      for r, i in enumerate(batch):
        n, end = len(requests[i][2]), len(rows[i]) - 1
        out[i] = (float(logp[r, end - n:end].astype(np.float64).sum()),
                  bool(greedy[r, end - n:end].all()))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Whole-text log likelihood in disjoint windows of max_length (as the `hf` model)."""
    windows, owner = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None,) + w)
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[i] += logp
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy completions through the KV cache, batched by generation arguments."""
    del disable_tqdm
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
    for idx in groups.values():
      kw = dict(requests[idx[0]].args[1])
      until = kw.pop("until", None) or [self.tok_decode([self.eot_token_id])]
      until = [until] if isinstance(until, str) else list(until)
      n = int(kw.pop("max_gen_toks", self.max_gen_toks))
      if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0)) > 0:
        raise ValueError("generate_until: only greedy decoding (do_sample=False, temperature=0)")
      keep = self.max_length - n
      for start in range(0, len(idx), self.batch_size):
        batch = idx[start:start + self.batch_size]
        ids = [self.tok_encode(requests[i].args[0])[-keep:] for i in batch]
        texts = generation.complete(self.model, self.tok, ids, n, stop=until)
        for i, t in zip(batch, texts):
          out[i] = t
    return out


def task_manager(tasks: Sequence[str]):
  """(harness TaskManager, task names) for names and YAML paths: moe_jax's bundled tasks
  and each YAML's directory on the include path; the harness's own task index is read
  only when a name is not found there (indexing its hundreds of tasks takes seconds)."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  names, paths = [], [harness_tasks.TASKS_DIR]
  for t in tasks:
    if t.endswith((".yaml", ".yml")):
      names.append(_yaml_task_name(t))
      paths.append(os.path.dirname(os.path.abspath(t)))
    else:
      names.append(t)
  tm = TaskManager(include_path=paths, include_defaults=False)
  if not all(n in tm.all_tasks for n in names):
    tm = TaskManager(include_path=paths)
  unknown = [n for n in names if n not in tm.all_tasks]
  if unknown:
    raise ValueError(f"config.tasks: unknown task {unknown[0]!r} (not a harness task, a bundled "
                     f"one in {harness_tasks.TASKS_DIR}, or a YAML path)")
  return tm, names


def _yaml_task_name(path: str) -> str:
  from lm_eval.tasks._yaml_loader import load_yaml  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: task file not found")
  try:
    cfg = load_yaml(path, resolve_func=False)
  except Exception as e:  # the YAML parser's own errors, several classes
    raise ValueError(f"{path}: not a harness task YAML ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
    raise ValueError(f"{path}: expected a harness task YAML with a `task:` name")
  return cfg["task"]


def evaluate_tasks(lm: MoeJaxLM, tasks: Sequence[str], limit: int | None = None,
                   num_fewshot: int | None = None, manager=None) -> dict:
  """The harness's results dict ({"results": {task: {metric: value}}, ...}) for `tasks`;
  `manager` is task_manager(tasks) when the caller has already built it."""
  from lm_eval import evaluator  # pylint: disable=g-import-not-at-top
  tm, names = manager or task_manager(tasks)
  return evaluator.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=False,
                                   bootstrap_iters=0, verbosity="WARNING")


def main(argv: Sequence[str] | None = None) -> None:
  """The harness's command line, with moe_jax's model and bundled tasks available."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--include_path" not in argv:
    argv += ["--include_path", harness_tasks.TASKS_DIR]
  sys.argv = [sys.argv[0]] + argv
  cli_evaluate()
