"""What the experiment binaries run: importable from a notebook, one function per job.

Every job that takes a checkpoint reads it through `moe_jax.convert.load.open_source`:
a GGUF file, an HF directory, a moe_jax checkpoint, a train workdir or one of its steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import ml_collections
from absl import logging

from moe_jax import checkpoint, locks, sharding, sweep
from moe_jax import evaluate as eval_lib, generation
from moe_jax.convert import load
from moe_jax.data import corpus, pipeline
from moe_jax.models import layer_stack
from moe_jax.train import init_plan, loop as loop_lib, optim
from moe_jax.upcycle import calibrate, convert, merge as merge_lib, methods


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


def eval_overrides(cfg, moe: dict) -> dict:
  """ModelConfig overrides for evaluation: the dispatch `backend` and `capacity_factor`
  of an MoE model ('' and 0 keep the checkpoint's). Capacity drops raise the loss at
  evaluation, so a model trained with capacity is often evaluated dropless."""
  moe = {k: v for k, v in dict(moe).items() if v}
  if not moe or cfg.moe is None:
    return {}
  return {"moe": dataclasses.replace(cfg.moe, **moe)}


def evaluate(config, workdir: str) -> dict:
  """Perplexity (and optional completion, and harness tasks) of `config.checkpoint`;
  writes workdir/eval.json (and workdir/lm_eval.json for tasks)."""
  text, text_name = eval_text(config.eval_file)
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size={config.batch_size}: expected a positive integer")
  tasks = [t.strip() for t in config.get("tasks", "").split(",") if t.strip()]
  manager = None
  if tasks:
    from moe_jax import harness  # pylint: disable=g-import-not-at-top  (the `eval` extra)
    manager = harness.task_manager(tasks)  # unknown names, bad files: before any compute
  src = load.open_source(config.checkpoint)
  check_seq_len(config.seq_len, src.cfg.max_seq_len)
  tok = src.tokenizer()
  windows = eval_lib.make_windows(tok.encode(text), config.seq_len, config.max_windows, text_name)
  model = src.model(dtype=config.dtype, **eval_overrides(src.cfg, config.moe))
  logging.info("evaluating %d windows of %d tokens", len(windows), config.seq_len)
  t0 = time.time()
  result = eval_lib.perplexity(model, windows, config.batch_size)
  result.update(checkpoint=src.path if config.checkpoint else load.EMBEDDED, kind=src.kind,
                step=src.meta.get("step"), eval_file=text_name, seq_len=config.seq_len,
                windows=len(windows), seconds=round(time.time() - t0, 2),
                backend=model.cfg.moe.backend if model.cfg.moe else None)
  if config.prompt:
    ids = generation.generate(model, [tok.encode(config.prompt)], config.max_new_tokens,
                              eos_id=tok.eos_id)[0]
    result["completion"] = tok.decode(ids)
    print(f"prompt: {config.prompt!r}\ncompletion: {result['completion']!r}")
  harness_out = _harness_tasks(config, tasks, manager, src, model, tok) if tasks else None
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    if harness_out is not None:
      checkpoint.write_json_atomic(os.path.join(workdir, "lm_eval.json"), harness_out)
    checkpoint.write_json_atomic(os.path.join(workdir, "eval.json"), result)
  except BaseException:
    if created:  # leave nothing behind: the workdir was made for these files
      with contextlib.suppress(OSError):
        for name in ("lm_eval.json", "eval.json"):
          with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(workdir, name))
        os.rmdir(workdir)
    raise
  print(f"eval_loss={result['eval_loss']:.6f} ppl={result['ppl']:.4f} tokens={result['tokens']}")
  if harness_out is not None:
    result["tasks"] = harness_out["results"]
    for name, metrics in harness_out["results"].items():
      print(f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                   if isinstance(v, float)))
  return result


def _harness_tasks(config, tasks: list[str], manager, src: load.Source, model, tok) -> dict:
  """The harness's results for `tasks` (dropless for a capacity MoE unless config.moe says)."""
  from moe_jax import harness  # pylint: disable=g-import-not-at-top
  if not config.moe.backend and harness.needs_dropless(model.cfg.moe):
    model = harness.evaluation_model(src, config.dtype)
  lm = harness.MoeJaxLM(model=model, tokenizer=tok, batch_size=config.batch_size)
  out = harness.evaluate_tasks(lm, tasks, limit=config.task_limit or None,
                               num_fewshot=None if config.num_fewshot < 0 else config.num_fewshot,
                               manager=manager)
  keep = ("results", "versions", "n-shot", "n-samples", "config")
  return {k: out[k] for k in keep if k in out}


def analyze(config, workdir: str) -> dict:
  """What the experts of `config.checkpoint` learned: analysis.json, PNGs and report.md,
  written to a temporary directory and renamed into `workdir` when complete."""
  from moe_jax.analysis import report, run  # pylint: disable=g-import-not-at-top
  if not config.checkpoint:
    raise ValueError("config.checkpoint: required (an MoE checkpoint to analyse)")
  workdir = os.path.abspath(workdir)
  if os.path.isdir(workdir) and os.listdir(workdir) and not config.overwrite:
    raise FileExistsError(f"{workdir}: exists and is not empty (set --config.overwrite=True)")
  cfg = run.AnalysisConfig(windows=config.windows, seq_len=config.seq_len,
                           batch_size=config.batch_size, detail_layers=config.detail_layers,
                           domain_windows=config.domain_windows, prompt=config.prompt)
  src = load.open_source(config.checkpoint)
  ref_path = run.reference_from_provenance(src.meta) if config.reference == "" else (
      None if config.reference == "none" else config.reference)
  ref = load.open_source(ref_path) if ref_path is not None else None
  text, text_name = eval_text(config.text_file)
  result, extra = run.analyze(src, ref, text, cfg, text_name)
  with checkpoint.atomic_dir(workdir, overwrite=config.overwrite) as tmp:
    checkpoint.write_json_atomic(os.path.join(tmp, "analysis.json"), result)
    figures = report.write(result, extra, tmp)
  print(f"analysed {src.path} ({len(result['layers'])} MoE layers, reference: "
        f"{result['reference']}): {len(figures)} figures, "
        f"{os.path.join(os.path.abspath(workdir), 'report.md')}")
  return result


def upcycle(config, workdir: str) -> dict:
  """Dense checkpoint -> MoE checkpoint in `workdir` (streamed), then perplexities."""
  workdir = os.path.abspath(workdir)
  if os.path.isdir(workdir) and os.listdir(workdir) and not config.overwrite:
    raise FileExistsError(f"{workdir}: exists and is not empty (set --config.overwrite=True)")
  spec = methods.UpcycleSpec(**config.upcycle)
  paths = [s for s in config.merge_sources.split(",") if s]
  merge = (merge_lib.open_sources(paths, spec, config.moa.shared_kv)
           if paths or spec.method in methods.MERGE_METHODS else [])
  src = merge[0] if merge else load.open_source(config.source)
  if src.is_moe:
    raise ValueError(f"{src.path}: already an MoE model; expected a dense checkpoint")
  if config.block not in ("", src.cfg.block):
    raise ValueError(f"config.block={config.block!r}: {src.path} is a {src.cfg.block} model "
                     "and upcycling keeps its function, so its block form stays ('' = keep)")
  moe_cfg = merge_lib.merged_model_config(src.cfg, spec, config.layers, config.moa.to_dict(),
                                          backend=config.backend)
  tok = src.tokenizer() if src.has_tokenizer() else None
  if tok is None and (config.router_init in ("kmeans", "hidden") or config.eval_windows):
    raise ValueError(f"{src.path}: no tokenizer.json, needed for router_init="
                     f"{config.router_init} and evaluation (set --config.eval_windows=0)")
  routers = None
  if config.router_init in ("kmeans", "hidden"):
    routers = calibrate.data_routers(
        config.router_init, src.model(), tok, spec, moe_cfg.moe_layer_ids, seed=config.seed,
        std=config.router_std, calib_windows=config.calib_windows,
        hidden_prompts=config.hidden_prompts)
  upcycler = convert.Upcycler(spec, moe_cfg, config.router_init, config.router_std, config.seed,
                              routers)
  items = (merge_lib.merged_items(merge, moe_cfg, upcycler, config.router_std, config.merge_base)
           if merge else convert.upcycle_items(src.cfg, src.tensors(), upcycler))
  t0 = time.time()
  checkpoint.write_items(workdir, moe_cfg, items, tok,
                         _upcycle_provenance(config, spec, src, merge), overwrite=config.overwrite)
  result = {"upcycle_seconds": round(time.time() - t0, 2), "method": spec.method}
  print(f"upcycled {src.path}{f' (+{len(merge) - 1} sources)' if len(merge) > 1 else ''} -> "
        f"{workdir} ({spec.method}, {spec.num_experts} experts, "
        f"top-{spec.top_k}) in {result['upcycle_seconds']}s")
  if config.eval_windows:
    result.update(_side_by_side_ppl(src, workdir, tok, config.eval_windows))
  return result


def _upcycle_provenance(config, spec, src: load.Source, merge: list[load.Source]) -> dict:
  return {"source": src.path, "kind": src.kind, "merge_sources": [m.path for m in merge],
          "merge_base": config.merge_base if merge else None,
          "moa": config.moa.to_dict() if spec.method == "bam" else None,
          "source_sha256": [m.sha256() for m in (merge or [src])], "init": src.describe(),
          "upcycle": dataclasses.asdict(spec), "layers": config.layers,
          "router_init": config.router_init, "router_std": config.router_std,
          "seed": config.seed, "versions": checkpoint.versions()}


def _side_by_side_ppl(dense: load.Source, workdir: str, tok, n_windows: int) -> dict:
  """Dense and upcycled perplexity on the same windows; writes upcycle_eval.json."""
  windows = eval_lib.make_windows(tok.encode(corpus.embedded_eval_text()), 512, n_windows,
                                  "pydoc_data.topics")
  result = {"dense_ppl": eval_lib.perplexity(dense.model(), windows)["ppl"]}
  result["upcycled_ppl"] = eval_lib.perplexity(checkpoint.load(workdir), windows)["ppl"]
  checkpoint.write_json_atomic(os.path.join(workdir, "upcycle_eval.json"), result)
  print(f"dense_ppl={result['dense_ppl']:.4f} upcycled_ppl={result['upcycled_ppl']:.4f} "
        f"tokens={len(windows) * 511}")
  return result


def train_mesh(config, num_experts: int | None = None):
  """The mesh of `config.mesh` over all devices, checked against the batch and the
  expert count: one-line errors naming the axis, before anything is built."""
  mesh = sharding.make_mesh(**config.mesh)
  if num_experts and num_experts % mesh.shape["expert"]:
    raise ValueError(f"mesh.expert={mesh.shape['expert']} does not divide the "
                     f"{num_experts} experts (config.upcycle.num_experts or the checkpoint's)")
  sharding.check_batch(config.loop.batch_size, mesh)
  return mesh


def data_texts(config) -> tuple[list[str], list[str]]:
  """(train, eval) documents of the configured source, as text."""
  src = config.data.source
  if src in ("stdlib", "stdlib+pydoc"):
    train_docs, eval_docs = corpus.stdlib_documents("train"), corpus.stdlib_documents("valid")
    if src == "stdlib+pydoc":  # both domains; each keeps its own held-out split
      train_docs, eval_docs = (corpus.interleave(train_docs, corpus.pydoc_documents("train")),
                               corpus.interleave(eval_docs, corpus.pydoc_documents("valid")))
  elif src == "pydoc":  # the English domain alone, with the same held-out split
    train_docs, eval_docs = corpus.pydoc_documents("train"), corpus.pydoc_documents("valid")
  elif src.startswith("hf:"):
    train_docs, eval_docs = corpus.hf_documents(src[3:], config.data.field)
  else:
    train_docs, eval_docs = corpus.held_out(corpus.read_documents(src, config.data.field))
  if config.data.max_docs:
    train_docs = train_docs[: config.data.max_docs]
  return train_docs, eval_docs


EMBEDDED_SOURCES = ("stdlib", "pydoc", "stdlib+pydoc")  # the embedded text's domains


def domain_eval_texts(config) -> dict[str, list[str]]:
  """{domain: its held-out documents} for a run on the embedded text (python and english,
  whichever of them the run trains on: a domain branch is scored on the other domain too),
  for a loss per domain at the end of a run; {} for other sources."""
  if config.data.source not in EMBEDDED_SOURCES:
    return {}
  return {"python": corpus.stdlib_documents("valid"), "english": corpus.pydoc_documents("valid")}


def final_scores(model, config, tok, eval_docs: list | None, mesh=None) -> dict[str, float]:
  """The final record's held-out scores: 'eval_loss', 'eval_ppl' and 'eval_tokens' over the
  run's held-out documents (unless None), and '<key>/<domain>' over each domain's
  (domain_eval_texts). With loop.final_eval='split' every token of each split is scored;
  with 'batches' the first loop.eval_batches batches (the loop's own evaluation)."""
  loop_cfg = loop_lib.LoopConfig(**config.loop)
  sets = {} if eval_docs is None else {"": eval_docs}
  for name, texts in domain_eval_texts(config).items():
    sets[f"/{name}"] = pipeline.tokenize_documents(texts, tok.encode_batch, tok.eos_id)
  out = {}
  for suffix, docs in sets.items():
    batches = (loop_lib.held_out_split(docs, loop_cfg, mesh) if loop_cfg.final_eval == "split"
               else loop_lib.held_out_batches(docs, loop_cfg, mesh))
    scored = loop_lib.evaluate_batches(model, batches, mesh, loop_cfg.batch_size)
    if scored["eval_tokens"]:
      out.update({f"{k}{suffix}": v for k, v in scored.items()})
  return out


def rescore(run_dir: str, final_eval: str = "split") -> dict:
  """Scores a finished run's last checkpoint again with loop.final_eval=`final_eval`
  (final_scores, on the data its provenance names) and rewrites its final.json; the
  loop's own last evaluation is kept as 'sample_eval_loss'. Returns the new record."""
  src = load.open_source(run_dir)
  config = ml_collections.ConfigDict(src.meta["provenance"]["train_config"])
  config.loop.final_eval = final_eval
  tok = src.tokenizer()
  eval_docs = data_documents(config, data_texts(config), tok)[1]
  record = sweep.read_final(run_dir)
  record.setdefault("sample_eval_loss", record.get("eval_loss"))
  record.update(final_scores(src.model(), config, tok, eval_docs), final_eval=final_eval)
  checkpoint.write_json_atomic(sweep.final_path(run_dir), record)
  return record


def data_documents(config, texts, tok):
  """(train, eval) token documents of the (train, eval) texts."""
  enc = lambda docs: pipeline.tokenize_documents(docs, tok.encode_batch, tok.eos_id)
  train_ids, eval_ids = enc(texts[0]), enc(texts[1])
  if not train_ids or sum(len(d) for d in train_ids) <= config.loop.seq_len:
    raise ValueError(f"config.data.source={config.data.source!r}: too little text for one "
                     f"row of {config.loop.seq_len} tokens")
  return train_ids, eval_ids or train_ids[:1]


def train(config, workdir: str) -> dict:
  """Trains the model `config.init` describes; returns the last logged metrics."""
  return train_model(config, workdir)[1]


def train_model(config, workdir: str):
  """(trained model, last logged metrics) of the run `config` describes
  (moe_jax.train.init_plan), resumable from `workdir`. Every process of a multi-host run
  calls this (after `moe_jax.distributed.initialize`); process 0 writes the files, holding
  the workdir's lock (moe_jax.locks) from start to end: one run per workdir."""
  workdir = os.path.abspath(workdir)
  with locks.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train_model(config, workdir)


def _train_model(config, workdir: str):
  loop_cfg = loop_lib.LoopConfig(**config.loop)
  opt_cfg = optim.OptimConfig(**config.optim)
  texts = data_texts(config)
  plan = init_plan.plan(config, workdir, train_texts=texts[0])
  moe = plan.cfg.moe
  if moe is not None and moe.top_k == 1 and moe.router == "topk_softmax":
    logging.warning("top-1 with router=topk_softmax weighs every choice 1: the router learns "
                    "from the balance losses only (softmax_topk weighs it by its probability)")
  mesh = train_mesh(config, plan.num_experts)  # before anything is built
  check_seq_len(loop_cfg.seq_len, plan.cfg.max_seq_len, "config.loop.seq_len")
  train_docs, eval_docs = data_documents(config, texts, plan.tokenizer)
  model = plan.build(mesh, loop_cfg.seed)
  if plan.cfg.scan_layers:  # stored stacked while it trains: the step scans over them as
    model = layer_stack.stack_layers(model)  # they are (the per-layer arrays are freed)
  lead = jax.process_index() == 0
  if jax.process_count() > 1:  # every process has read workdir before process 0 writes it
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("moe_jax.runs.train")
  if lead:
    os.makedirs(workdir, exist_ok=True)
    plan.tokenizer.save(workdir)
    print(f"training {checkpoint.param_count(model) / 1e6:.1f}M params "
          f"({len(model.cfg.moe_layer_ids)} MoE layers, init: {plan.kind}) for "
          f"{loop_cfg.steps} steps on mesh " + " ".join(f"{a}={n}" for a, n in mesh.shape.items()))
  meta = {"provenance": plan.provenance, "prior_tokens_seen": plan.prior_tokens}
  last = loop_lib.train(model, train_docs, eval_docs, loop_cfg, opt_cfg, workdir, mesh=mesh,
                        meta=meta, resume_step=plan.resume_step or 0)
  model = layer_stack.unstack_layers(model)
  final = sweep.final_path(workdir)
  if not last and os.path.exists(final):  # finished before: nothing trained, keep its record
    return model, sweep.read_final(workdir)
  if loop_cfg.eval_batches:  # the loop's last evaluation is the 'batches' score
    whole = loop_cfg.final_eval == "split"
    sample = {"sample_eval_loss": last.get("eval_loss")} if whole else {}
    last = {**last, **sample, "final_eval": loop_cfg.final_eval,
            **final_scores(model, config, plan.tokenizer, eval_docs if whole else None, mesh)}
  if lead:
    checkpoint.write_json_atomic(final, last)
    if "eval_loss" in last:
      print(f"final eval_loss={last['eval_loss']:.4f} loss={last['loss']:.4f}")
  return model, last
