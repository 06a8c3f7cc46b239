"""What the experiment binaries run: importable from a notebook, one function per job."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable

from absl import logging

from moe_jax import checkpoint
from moe_jax import evaluate as eval_lib
from moe_jax.convert import load
from moe_jax.data import corpus

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               FloatingPointError)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for the binaries (app.run(..., flags_parser=parse_flags)): a bad
  flag or config override (e.g. an unknown --config key) is one line and exit status 1."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise assorted types
    msg = " ".join(re.sub(r"\\n|[\\'\"]", " ", str(e)).split())
    print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
    sys.exit(1)


def main_guard(fn: Callable, *args, **kwargs):
  """Runs `fn`; a user error becomes one line on stderr and exit status 1."""
  if logging.get_verbosity() == logging.INFO:  # orbax logs every file at INFO; keep warnings
    logging.set_verbosity(logging.WARNING)
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


def demo(workdir: str, max_windows: int = 8, train_steps: int = 16) -> dict:
  """The main job on the embedded defaults: SmolLM2-135M-Instruct's perplexity and a
  completion; its upcycling into 8 experts top-2 (dense vs upcycled perplexity); then a
  short continued training of an upcycled model next to the dense one on the same tokens."""
  from configs import evaluate as eval_config  # pylint: disable=g-import-not-at-top
  from configs import train as train_config  # pylint: disable=g-import-not-at-top
  from configs import upcycle as upcycle_config  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  print("== 1/3 dense SmolLM2-135M-Instruct (embedded GGUF) on pydoc_data.topics")
  config = eval_config.get_config()
  config.max_windows = max_windows
  config.prompt = "The three most useful Python built-in functions are"
  dense = evaluate(config, os.path.join(workdir, "dense_eval"))
  print("== 2/3 upcycle: copy into 8 experts, top-2, every layer (streamed to disk)")
  config = upcycle_config.get_config("method=copy,experts=8,topk=2")
  config.eval_windows, config.overwrite = max_windows, True
  up = upcycle(config, os.path.join(workdir, "moe_8x_top2"))
  print(f"== 3/3 continued training, {train_steps} steps on the same stdlib tokens: "
        "MoE (4 experts top-2 in layers 9/19/29, upcycled on the fly) vs dense")
  losses = {}
  for name, arg in (("moe", "method=copy"), ("dense", "method=none")):
    config = train_config.get_config(f"runlocal,{arg},steps={train_steps}")
    run_dir = os.path.join(workdir, f"train_{name}")
    shutil.rmtree(run_dir, ignore_errors=True)
    losses[name] = train(config, run_dir)["eval_loss"]
  print(f"dense_ppl={dense['ppl']:.4f} upcycled_ppl={up['upcycled_ppl']:.4f} "
        f"moe_eval_loss={losses['moe']:.4f} dense_eval_loss={losses['dense']:.4f}")
  return {"dense": dense, "upcycle": up, "train": losses}


def _sha256(path: str) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
  h = hashlib.sha256()
  for f in files:
    with open(f, "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 24), b""):
        h.update(chunk)
  return h.hexdigest()


def _versions() -> dict[str, str]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  return {p: md.version(p) for p in ("jax", "flax", "orbax-checkpoint", "moe_jax")
          if _installed(p)}


def _installed(pkg: str) -> bool:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  try:
    md.version(pkg)
    return True
  except md.PackageNotFoundError:
    return False


def _routers(config, source: str, dense_cfg, spec, tok, ids) -> dict[int, "np.ndarray"] | None:
  """Data-driven routers (kmeans over calibration text, or per-prompt 'hidden' states)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from moe_jax.upcycle import calibrate, router_init  # pylint: disable=g-import-not-at-top
  if config.router_init not in ("kmeans", "hidden"):
    return None
  model, _ = load.load_model(source)
  repeat = spec.granularity if spec.method == "virtual_group" else 1
  rng = np.random.default_rng(config.seed)
  if config.router_init == "kmeans":
    windows = eval_lib.make_windows(tok.encode("\n".join(corpus.stdlib_documents("valid"))),
                                    256, config.calib_windows, "calibration text")
    states = calibrate.layer_states(model, windows)
    return {i: router_init.init_router("kmeans", dense_cfg.d_model, spec.num_experts, rng,
                                       std=config.router_std, repeat=repeat, hidden_NxD=states[i])
            for i in ids}
  prompts = [p for p in config.hidden_prompts.split("|") if p.strip()]
  if len(prompts) != spec.num_experts // repeat:
    raise ValueError(f"config.hidden_prompts: {len(prompts)} prompts, expected "
                     f"{spec.num_experts // repeat} (one per router column)")
  dirs = calibrate.prompt_directions(model, [tok.encode(p) for p in prompts])
  return {i: router_init.init_router("hidden", dense_cfg.d_model, spec.num_experts, rng,
                                     std=config.router_std, repeat=repeat,
                                     directions_RxD=dirs[i] - dirs[i].mean(0, keepdims=True))
          for i in ids}


def upcycle(config, workdir: str) -> dict:
  """Dense checkpoint -> MoE checkpoint in `workdir` (streamed), then perplexities."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from moe_jax.convert import gguf, hf  # pylint: disable=g-import-not-at-top
  from moe_jax.upcycle import convert, methods  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if os.path.isdir(workdir) and os.listdir(workdir) and not config.overwrite:
    raise FileExistsError(f"{workdir}: exists and is not empty (set --config.overwrite=True)")
  spec = methods.UpcycleSpec(**config.upcycle)
  source = config.source or gguf.embedded_gguf_path()
  merge_sources = [s for s in config.merge_sources.split(",") if s]
  if spec.method == "merge" and not merge_sources:
    raise ValueError("config.merge_sources: method=merge needs one dense checkpoint per expert")
  dense_cfg = load.read_config(merge_sources[0] if merge_sources else source)
  moe_cfg = convert.moe_model_config(dense_cfg, spec, config.layers, backend=config.backend)
  config_ids = moe_cfg.moe_layer_ids
  tok = _optional_tokenizer(merge_sources[0] if merge_sources else source)
  if tok is None and (config.router_init in ("kmeans", "hidden") or config.eval_windows):
    raise ValueError(f"{source}: no tokenizer.json, needed for router_init="
                     f"{config.router_init} and evaluation (set --config.eval_windows=0)")
  routers = _routers(config, source, dense_cfg, spec, tok, config_ids)
  upcycler = convert.Upcycler(spec, moe_cfg, config.router_init, config.router_std, config.seed,
                              routers)
  if merge_sources:
    tensors = _merge_stream(dense_cfg, merge_sources, config_ids, config.merge_base)
  elif load.checkpoint_kind(source) == "gguf":
    tensors = ((n, w, source) for n, w in gguf.iter_gguf_tensors(source))
  else:
    tensors = hf.iter_safetensors(source)
  provenance = {"source": source, "merge_sources": merge_sources,
                "source_sha256": [_sha256(p) for p in (merge_sources or [source])],
                "upcycle": dataclasses.asdict(spec), "layers": config.layers,
                "router_init": config.router_init, "router_std": config.router_std,
                "seed": config.seed, "versions": _versions()}
  t0 = time.time()
  checkpoint.write_items(workdir, moe_cfg, convert.upcycle_items(dense_cfg, tensors, upcycler),
                         tok, provenance, overwrite=config.overwrite)
  result = {"upcycle_seconds": round(time.time() - t0, 2), "method": spec.method}
  print(f"upcycled {source} -> {workdir} ({spec.method}, {spec.num_experts} experts, "
        f"top-{spec.top_k}) in {result['upcycle_seconds']}s")
  if config.eval_windows:
    windows = eval_lib.make_windows(tok.encode(corpus.embedded_eval_text()), 512,
                                    config.eval_windows, "pydoc_data.topics")
    dense_model, _ = load.load_model(merge_sources[0] if merge_sources else source)
    result["dense_ppl"] = eval_lib.perplexity(dense_model, windows)["ppl"]
    del dense_model
    result["upcycled_ppl"] = eval_lib.perplexity(checkpoint.load(workdir), windows)["ppl"]
    checkpoint.write_json_atomic(os.path.join(workdir, "upcycle_eval.json"), result)
    print(f"dense_ppl={result['dense_ppl']:.4f} upcycled_ppl={result['upcycled_ppl']:.4f} "
          f"tokens={len(windows) * 511}")
  return result


def _optional_tokenizer(path: str):
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
    return None
  return load.load_tokenizer(path)


def _merge_stream(dense_cfg, sources: list[str], moe_ids, base: int):
  from moe_jax.convert import gguf, hf  # pylint: disable=g-import-not-at-top
  from moe_jax.upcycle import convert  # pylint: disable=g-import-not-at-top
  dicts, names = [], None
  for i, src in enumerate(sources):
    cfg = load.read_config(src)
    if cfg.replace(arch=dense_cfg.arch) != dense_cfg:
      raise ValueError(f"{src}: merge source {i} has a different architecture or shape "
                       f"than {sources[0]}")
    it = ((n, w) for n, w in gguf.iter_gguf_tensors(src)) if src.endswith(".gguf") else (
        (n, w) for n, w, _ in hf.iter_safetensors(src))
    d = dict(it)
    dicts.append(d)
    names = names or list(d)
  return convert.merged_tensors(dense_cfg, set(moe_ids), dicts, names, base)


def _train_model_config(config, workdir: str, tok):
  """(ModelConfig of the model to train, how to build it): the restored config when
  resuming, else the one `config.init` and `config.upcycle` describe. Reads configs only."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from moe_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from moe_jax.upcycle import convert, methods  # pylint: disable=g-import-not-at-top
  meta = os.path.join(workdir, "model_config.json")
  if os.path.exists(meta):  # resuming: the checkpoint will overwrite every param
    with open(meta) as f:
      return ModelConfig.from_dict(json.load(f)), "random"
  spec = None if config.upcycle.method == "none" else methods.UpcycleSpec(**config.upcycle)
  moe_over = ml_collections.ConfigDict(config.moe).to_dict()
  if config.init == "scratch":
    dense_cfg = ModelConfig(vocab_size=tok.vocab_size, dtype=config.dtype, **config.scratch)
    if spec is None:
      return dense_cfg, "random"
    return convert.moe_model_config(dense_cfg, spec, config.layers, **moe_over), "random"
  if load.checkpoint_kind(config.init) == "moe_jax" or spec is None:
    return load.read_config(config.init, dtype=config.dtype), "load"
  dense_cfg = load.read_config(config.init)
  return convert.moe_model_config(dense_cfg, spec, config.layers, **moe_over), "upcycle"


def _train_model(config, cfg, how: str, mesh):
  """The model to train, its params on `mesh`: random (created sharded), loaded (placed
  as read) or upcycled on the fly (built in host memory, then placed)."""
  from moe_jax import sharding  # pylint: disable=g-import-not-at-top
  from moe_jax.models import llama  # pylint: disable=g-import-not-at-top
  from moe_jax.upcycle import convert, methods  # pylint: disable=g-import-not-at-top
  if how == "random":
    return llama.create(cfg, config.loop.seed, mesh=mesh)
  if how == "load":
    model, _ = load.load_model(config.init, mesh=mesh, dtype=config.dtype)
    return model
  dense, _ = load.load_model(config.init)
  spec = methods.UpcycleSpec(**config.upcycle)
  upcycler = convert.Upcycler(spec, cfg, config.router_init, config.router_std,
                              config.loop.seed)
  items = list(convert.upcycle_items(dense.cfg, convert.dense_tensors(dense), upcycler))
  del dense
  return sharding.place(convert.model_from_items(cfg.replace(dtype=config.dtype), items), mesh)


def _num_experts(config, workdir: str) -> int | None:
  """Experts per MoE layer of the model `config` trains (None: dense), from configs only."""
  from moe_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  meta = os.path.join(workdir, "model_config.json")
  if os.path.exists(meta):
    with open(meta) as f:
      cfg = ModelConfig.from_dict(json.load(f))
  elif config.init not in ("", "scratch") and load.checkpoint_kind(config.init) == "moe_jax":
    cfg = load.read_config(config.init)
  else:
    return None if config.upcycle.method == "none" else config.upcycle.num_experts
  return cfg.moe.num_experts if cfg.moe else None


def train_mesh(config, num_experts: int | None = None):
  """The mesh of `config.mesh` over all devices, checked against the batch and the
  expert count: one-line errors naming the axis, before anything is built."""
  from moe_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(**config.mesh)
  if num_experts and num_experts % mesh.shape["expert"]:
    raise ValueError(f"mesh.expert={mesh.shape['expert']} does not divide the "
                     f"{num_experts} experts (config.upcycle.num_experts or the checkpoint's)")
  sharding.check_batch(config.loop.batch_size, mesh)
  return mesh


def _documents(config, tok):
  """(train, eval) token documents for the configured source."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  src = config.data.source
  if src == "stdlib":
    train_docs, eval_docs = corpus.stdlib_documents("train"), corpus.stdlib_documents("valid")
  elif src.startswith("hf:"):
    train_docs, eval_docs = corpus.hf_documents(src[3:], config.data.field)
  else:
    docs = corpus.read_documents(src, config.data.field)
    cut = max(1, len(docs) // 20)
    train_docs, eval_docs = docs[cut:] or docs, docs[:cut]
  if config.data.max_docs:
    train_docs = train_docs[: config.data.max_docs]
  enc = lambda docs: pipeline.tokenize_documents(docs, tok.encode, tok.eos_id)
  train, evals = enc(train_docs), enc(eval_docs)
  if not train or sum(len(d) for d in train) <= config.loop.seq_len:
    raise ValueError(f"config.data.source={src!r}: too little text for one row of "
                     f"{config.loop.seq_len} tokens")
  return train, evals or train[:1]


def train(config, workdir: str) -> dict:
  """Continued training of an upcycled or dense model; resumable from `workdir`. Every
  process of a multi-host run calls this (after `moe_jax.distributed.initialize`);
  process 0 writes the JSON files and metrics."""
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax.train import loop as loop_lib, optim  # pylint: disable=g-import-not-at-top
  loop_cfg = loop_lib.LoopConfig(**config.loop)
  opt_cfg = optim.OptimConfig(**config.optim)
  if config.init not in ("", "scratch"):
    load.checkpoint_kind(config.init)  # a missing or unknown checkpoint fails here
  workdir = os.path.abspath(workdir)
  mesh = train_mesh(config, _num_experts(config, workdir))  # before anything is built
  tok = load.load_tokenizer("" if config.init in ("", "scratch") else config.init)
  max_len = (config.scratch.max_seq_len if config.init == "scratch"
             else load.read_config(config.init).max_seq_len)
  check_seq_len(loop_cfg.seq_len, max_len, "config.loop.seq_len")
  model_cfg, how = _train_model_config(config, workdir, tok)
  train_docs, eval_docs = _documents(config, tok)
  model = _train_model(config, model_cfg, how, mesh)
  lead = jax.process_index() == 0
  if jax.process_count() > 1:  # every process has read workdir before process 0 writes it
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("moe_jax.runs.train")
  if lead:
    os.makedirs(workdir, exist_ok=True)
    checkpoint.write_json_atomic(os.path.join(workdir, "model_config.json"),
                                 model.cfg.to_dict())
    print(f"training {checkpoint.param_count(model) / 1e6:.1f}M params "
          f"({len(model.cfg.moe_layer_ids)} MoE layers) for {loop_cfg.steps} steps on mesh "
          + " ".join(f"{a}={n}" for a, n in mesh.shape.items()))
  last = loop_lib.train(model, train_docs, eval_docs, loop_cfg, opt_cfg, workdir, mesh=mesh,
                        meta={"config": config.to_dict()})
  if lead:
    checkpoint.write_json_atomic(os.path.join(workdir, "final.json"), last)
    if "eval_loss" in last:
      print(f"final eval_loss={last['eval_loss']:.4f} loss={last['loss']:.4f}")
  return last
