"""What a training run starts from, decided once.

`plan(config, workdir)` reads `config.init`, `config.upcycle` and the workdir a single
time and returns an `InitPlan`: the model config, the tokenizer, where the params come
from and the provenance the run's checkpoints will carry. Kinds:
  resume    the workdir has a finished step: the loop restores it;
  scratch   random params of `config.scratch` (an MoE of that shape with an upcycle spec);
  continue  a dense checkpoint trained further as it is (upcycle.method=none);
  upcycle   a dense checkpoint turned into an MoE on the fly by `config.upcycle`;
  load      an MoE checkpoint (moe_jax, HF MoE, or another train run) trained further;
  merge     several dense checkpoints (config.init, comma-separated, one per expert) merged
            into one MoE on the fly by upcycle.method=merge (BTX) or bam (BAM, with the
            attention experts of config.moa), moe_jax/upcycle/merge.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
from absl import logging

from moe_jax import checkpoint, errors
from moe_jax import tokenizer as tokenizer_lib
from moe_jax.config import ModelConfig
from moe_jax.convert import load
from moe_jax.models import llama
from moe_jax.train import checkpoints as train_ckpt
from moe_jax.upcycle import calibrate, convert, merge as merge_lib, methods

KINDS = ("resume", "scratch", "continue", "upcycle", "load", "merge")


@dataclasses.dataclass(frozen=True)
class InitPlan:
  kind: str
  cfg: ModelConfig                        # the model the run trains
  tokenizer: tokenizer_lib.Tokenizer
  source: load.Source | None = None       # where the params come from (None: random)
  upcycler: convert.Upcycler | None = None
  provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
  resume_step: int | None = None
  merge: tuple[load.Source, ...] = ()     # merge: the dense sources, one per expert

  @property
  def num_experts(self) -> int | None:
    return self.cfg.moe.num_experts if self.cfg.moe else None

  @property
  def prior_tokens(self) -> int:
    """Tokens the init had already seen in training here (0 for outside checkpoints); for
    a merge, every source's (a seed the branches share is counted once per branch)."""
    return sum(int(s.meta.get("tokens_seen_total", 0)) for s in self.merge or
               ([self.source] if self.source else []))

  def build(self, mesh, seed: int = 0) -> llama.Transformer:
    """The model with its params on `mesh` (a resume's random params are overwritten)."""
    if self.kind in ("resume", "scratch"):
      return llama.create(self.cfg, seed, mesh=mesh)
    if self.kind in ("continue", "load"):
      return self.source.model(mesh, dtype=self.cfg.dtype, remat=self.cfg.remat,
                               scan_layers=self.cfg.scan_layers)
    if self.kind == "merge":
      items = merge_lib.merged_items(self.merge, self.cfg, self.upcycler,
                                     self.upcycler.router_std)
    else:
      items = convert.upcycle_items(self.source.cfg, self.source.tensors(), self.upcycler)
    return convert.model_from_items(self.cfg, items, mesh)  # only this host's experts


def plan(config: ml_collections.ConfigDict, workdir: str,
         train_texts: list[str] | None = None) -> InitPlan:
  """The InitPlan of a train config (see the module docstring). A scratch run with
  `scratch.tokenizer='bpe:N'` learns its vocabulary from `train_texts`."""
  step_dir = _readable_step(workdir)
  if step_dir is not None:
    return _resume(config, step_dir)
  spec = None if config.upcycle.method == "none" else methods.UpcycleSpec(**config.upcycle)
  moe_over = ml_collections.ConfigDict(config.moe).to_dict()
  if config.init == "scratch":
    shape = config.scratch.to_dict()
    tok = _scratch_tokenizer(shape.pop("tokenizer", ""), train_texts)
    dense = ModelConfig(vocab_size=tok.vocab_size, **_compute(config), **shape)
    cfg = dense if spec is None else convert.moe_model_config(dense, spec, config.layers,
                                                               **moe_over)
    return InitPlan("scratch", cfg, tok, provenance=_provenance(config, None, spec))
  if spec is not None and spec.method in methods.MERGE_METHODS:
    return _merge(config, spec, moe_over)
  src = load.open_source(config.init)
  tok = src.tokenizer()
  if src.is_moe or spec is None:
    kind = "load" if src.is_moe else "continue"
    return InitPlan(kind, src.cfg.replace(**_compute(config)), tok, src,
                    provenance=_provenance(config, src, None))
  cfg = convert.moe_model_config(src.cfg, spec, config.layers, **moe_over)
  upcycler = convert.Upcycler(spec, cfg, config.router_init, config.router_std, config.loop.seed,
                              _routers(config, src, tok, spec, cfg.moe_layer_ids))
  return InitPlan("upcycle", cfg.replace(**_compute(config)), tok, src, upcycler,
                  _provenance(config, src, spec))


def _merge(config, spec: methods.UpcycleSpec, moe_over: dict) -> InitPlan:
  """The plan of a run that merges the dense checkpoints config.init lists (BTX, BAM)."""
  sources = merge_lib.open_sources([p for p in config.init.split(",") if p], spec,
                                   config.moa.shared_kv, key="config.init")
  if config.router_init != "normal":
    raise ValueError(f"config.router_init={config.router_init!r}: a merge draws its routers "
                     "('normal'); calibrated routers need one dense model")
  cfg = merge_lib.merged_model_config(sources[0].cfg, spec, config.layers, config.moa.to_dict(),
                                      **moe_over)
  upcycler = convert.Upcycler(spec, cfg, config.router_init, config.router_std, config.loop.seed)
  provenance = {**_provenance(config, sources[0], spec),
                "merge_sources": [s.path for s in sources],
                "merge_inits": [s.describe() for s in sources],
                "moa": config.moa.to_dict() if spec.method == "bam" else None}
  return InitPlan("merge", cfg.replace(**_compute(config)), sources[0].tokenizer(),
                  sources[0], upcycler, provenance, merge=tuple(sources))


def _compute(config) -> dict[str, Any]:
  """The ModelConfig fields the train config sets whatever the init: how it computes."""
  return {"dtype": config.dtype, "remat": config.get("remat", "none"),
          "scan_layers": config.get("scan_layers", False)}


def _readable_step(workdir: str) -> str | None:
  """The newest finished step whose metadata reads (an unreadable one is skipped with a
  one-line warning); None for a fresh workdir."""
  root = os.path.join(os.path.abspath(workdir), train_ckpt.CHECKPOINTS)
  finished = train_ckpt.finished_steps(workdir)
  names = os.listdir(root) if os.path.isdir(root) else []
  for bad in sorted(int(n) for n in names if n.isdigit() and int(n) not in finished):
    if not finished or bad > finished[-1]:  # renamed into place, so damaged, not in progress
      logging.warning("%s/%d is incomplete (no state/, meta/ or commit stamp); skipped",
                      root, bad)
  for step in reversed(finished):
    step_dir = os.path.join(root, str(step))
    try:
      meta = train_ckpt.read_meta(step_dir)
      meta["model"], meta["step"]  # pylint: disable=pointless-statement
      return step_dir
    except (OSError, ValueError, KeyError) as e:
      logging.warning("%s: its metadata does not read (%s); trying the previous step",
                      step_dir, errors.one_line(e)[:200])
  return None


def _scratch_tokenizer(spec: str, train_texts: list[str] | None) -> tokenizer_lib.Tokenizer:
  """The embedded model's vocabulary (''), or a BPE learned from the training text."""
  vocab_size = tokenizer_lib.bpe_vocab_size(spec)
  if vocab_size is None:
    return load.load_tokenizer("")
  if not train_texts:
    raise ValueError(f"config.scratch.tokenizer={spec!r}: no training text to learn it from")
  return tokenizer_lib.train_bpe(train_texts, vocab_size)


def _routers(config, src: load.Source, tok, spec, layer_ids):
  """k-means routers from calibration text (the dense model loaded once); 'hidden' needs
  prompts, which only the upcycle binary takes."""
  if config.router_init == "hidden":
    raise ValueError("config.router_init='hidden': needs prompts; upcycle with "
                     "experiments.upcycle --config.hidden_prompts, then train from it")
  if config.router_init != "kmeans":
    return None
  return calibrate.data_routers("kmeans", src.model(), tok, spec, layer_ids,
                                seed=config.loop.seed, std=config.router_std)


# Keys a resume may change without saying so: how often the loop logs, evaluates and
# saves, how far it runs, and the device layout (microbatching included: the same update).
# Everything else that differs from the saved run (model, init, data, optimizer) is
# refused unless named in config.resume_allow.
RESUME_FREE = ("loop.steps", "loop.log_every", "loop.eval_every", "loop.eval_batches",
               "loop.final_eval", "loop.ckpt_every", "loop.keep", "loop.inject_nan_at_step", "loop.grad_accum",
               "mesh", "remat", "scan_layers", "resume_allow")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resume_config(saved: dict, new: dict, allow: str, where: str) -> None:
  """Refuses, in one line naming the first key, a resume whose config differs from the
  saved run's outside RESUME_FREE and the comma-separated keys (or sections) `allow`.
  Keys the saved config lacks (added to the config since) are not compared."""
  free = RESUME_FREE + tuple(k.strip() for k in allow.split(",") if k.strip())
  old, cur = _flat(saved), _flat(json.loads(json.dumps(new, default=str)))  # as saved
  for key in sorted(set(old) | set(cur)):
    if any(key == f or key.startswith(f + ".") for f in free):
      continue
    if key not in old:  # a key added after the run was saved (its default keeps old behaviour)
      continue
    if old.get(key, "<unset>") != cur.get(key, "<unset>"):
      raise ValueError(
          f"{where}: resuming with config.{key}={cur.get(key, '<unset>')!r}, but the saved "
          f"run has {old.get(key, '<unset>')!r}; use a new workdir, or allow the change "
          f"with --config.resume_allow={key}")


def _resume(config, step_dir: str) -> InitPlan:
  src = load.open_source(step_dir)
  saved = src.meta.get("provenance", {}).get("train_config")
  if saved is not None:  # runs saved before this check have none
    check_resume_config(saved, config.to_dict(), config.get("resume_allow", ""), step_dir)
  provenance = dict(src.meta.get("provenance", {}), train_config=config.to_dict())
  cfg = src.cfg.replace(**{k: v for k, v in _compute(config).items() if k != "dtype"})
  return InitPlan("resume", cfg, src.tokenizer(), provenance=provenance,
                  resume_step=int(src.meta["step"]))


def _provenance(config, src: load.Source | None, spec) -> dict[str, Any]:
  return {"init": src.describe() if src else {"source": "scratch"},
          "upcycle": dataclasses.asdict(spec) if spec else None,
          "layers": config.layers if spec else None,
          "router_init": config.router_init if spec else None,
          "train_config": config.to_dict(), "versions": checkpoint.versions()}
