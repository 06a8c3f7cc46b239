"""The training loop: resumable (orbax + grain state), observable, preemption-safe.

Checkpoints hold params, optimizer state, router biases, the data iterator's state and
the step; the per-step RNG is fold_in(seed, step), so a resumed run repeats exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from moe_jax import errors
from moe_jax import metrics as metrics_lib
from moe_jax import sharding
from moe_jax.data import pipeline
from moe_jax.models import layer_stack
from moe_jax.train import checkpoints as train_ckpt, flops, optim, step as step_lib


FINAL_EVALS = ("batches", "split")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 100
  batch_size: int = 8
  seq_len: int = 256
  seed: int = 0
  log_every: int = 10
  eval_every: int = 50
  eval_batches: int = 4           # 0 = no evaluation
  final_eval: str = "batches"     # the final record's loss: the eval batches, or the whole
                                  # held-out split ("split")
  ckpt_every: int = 50
  keep: int = 2
  grad_accum: int = 1            # microbatches per step (step.grad_accumulate): same update
  inject_nan_at_step: int = -1   # testing hook: poison that step's loss mask with NaN

  def __post_init__(self):
    minimum = {"steps": 1, "batch_size": 1, "seq_len": 2, "log_every": 1, "eval_every": 1,
               "eval_batches": 0, "ckpt_every": 1, "keep": 1, "grad_accum": 1}
    for key, low in minimum.items():
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.loop.{key}={value!r}: expected an integer >= {low}")
    if self.final_eval not in FINAL_EVALS:
      raise ValueError(f"config.loop.final_eval={self.final_eval!r}: expected one of "
                       f"{', '.join(FINAL_EVALS)}")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"config.loop.grad_accum={self.grad_accum} does not divide "
                       f"config.loop.batch_size={self.batch_size}")


class Preempted:
  """Set by SIGTERM; the loop saves at the next step boundary and raises errors.Stopped
  (the binaries exit 0; the run is not finished, and the same command resumes it)."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, *_):
    self.flag = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._old)


def _save(mngr, step: int, state: nnx.State, data_iter, meta: dict, tokens_per_step: int,
          force: bool = False):
  tokens = step * tokens_per_step
  meta = dict(meta, step=step, tokens_seen=tokens,
              tokens_seen_total=meta.get("prior_tokens_seen", 0) + tokens)
  mngr.save(step, args=ocp.args.Composite(  # layers per layer, however they are stored
      state=ocp.args.StandardSave(layer_stack.unstack_tree(nnx.to_pure_dict(state))),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)), force=force)


def _restore(mngr, step: int, state: nnx.State, data_iter, mesh) -> None:
  target = sharding.abstract_arrays(state, mesh)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(layer_stack.unstack_tree(target)),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  nnx.replace_by_pure_dict(state, layer_stack.stack_tree(restored["state"], target))


def _non_finite(loss: float, grad_norm: float, params_finite: bool) -> str:
  """What is not finite after a step ('' if nothing): such a step is never saved."""
  if not math.isfinite(loss):
    return f"loss is {loss}"
  if not math.isfinite(grad_norm):
    return f"the gradient norm is {grad_norm} (loss {loss:.4f})"
  return "" if params_finite else "the updated params hold NaN or Inf"


def check_steps(pending: list[tuple[int, dict]]) -> tuple[float, str]:
  """(tokens trained in the `pending` (step, metrics) pairs, and '' or 'step N: what' for
  the first non-finite step), read from the device in one transfer. The loop calls it only
  at log and checkpoint steps, so the next steps are dispatched before a step's metrics
  are read (no host sync per step), and nothing unchecked is ever saved."""
  values = jax.device_get([(m["loss"], m["grad_norm"], m["params_finite"], m["tokens"])
                           for _, m in pending])
  for (step, _), (loss, grad_norm, finite, _) in zip(pending, values):
    bad = _non_finite(float(loss), float(grad_norm), bool(finite))
    if bad:
      return 0.0, f"step {step}: {bad}"
  return sum(float(v[3]) for v in values), ""


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _restore_good(mngr, step: int, state: nnx.State, data_iter, mesh) -> int:
  """Restores `step`, or else the newest earlier step that restores, saying so in one line
  per step that does not; a one-line error naming the workdir if none does. A damaged
  step is renamed `<step>.damaged` (kept, out of the way) so the run can save it anew."""
  damaged: dict[int, str] = {}  # step -> why it did not restore
  for s in [step] + sorted((x for x in mngr.all_steps() if x < step), reverse=True):
    try:
      _restore(mngr, s, state, data_iter, mesh)
    except Exception as e:  # orbax, tensorstore and OS errors of a damaged step
      damaged[s] = _one_line(e)
      logging.warning("%s/%d does not restore (%s); trying the previous step",
                      mngr.directory, s, damaged[s])
      continue
    if damaged and jax.process_index() == 0:
      for bad in damaged:
        path = os.path.join(str(mngr.directory), str(bad))
        os.replace(path, f"{path}.damaged-{int(time.time())}")
      mngr.reload()
    return s
  why = "; ".join(f"step {s}: {e}" for s, e in damaged.items())
  raise ValueError(f"{mngr.directory}: no checkpoint restores ({why})")


def _batch_to_device(batch: dict[str, np.ndarray], mesh, global_rows: int
                     ) -> dict[str, jax.Array]:
  """This process's rows of the global batch as global arrays sharded over the batch axes."""
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  spec = sharding.logical_to_spec(("batch", "length"), mesh_axes=mesh.axis_names)
  named = jax.sharding.NamedSharding(mesh, spec)
  return {k: jax.make_array_from_process_local_data(named, v, (global_rows, *v.shape[1:]))
          for k, v in batch.items()}


def _in_mesh(mesh):
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def evaluate_batches(model, batches: Iterable[dict], mesh, global_rows: int | None = None
                     ) -> dict[str, float]:
  """Mean held-out loss over the batches' unmasked tokens, and their count."""
  total, count = 0.0, 0.0
  for b in batches:
    rows = global_rows or len(b["tokens"])
    with _in_mesh(mesh):
      nll, n = step_lib.eval_step(model, _batch_to_device(b, mesh, rows))
    total += float(nll)
    count += float(n)
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}


def held_out_batches(eval_docs: list[np.ndarray], loop: LoopConfig, mesh=None) -> list[dict]:
  """The first loop.eval_batches batches of the held-out documents (this process's rows).
  They do not depend on loop.seed: runs that differ only in their seed (the study's
  seeds, a sweep's) are all scored on the same tokens."""
  shard, count = sharding.data_shard(mesh, loop.batch_size) if mesh is not None else (0, 1)
  it = iter(pipeline.packed_dataset(eval_docs, loop.seq_len, loop.batch_size, EVAL_SEED,
                                    shard_index=shard, shard_count=count, num_epochs=1))
  return [pipeline.to_batch(b) for _, b in zip(range(loop.eval_batches), it)]


def held_out_split(eval_docs: list[np.ndarray], loop: LoopConfig, mesh=None
                   ) -> Iterator[dict]:
  """Every token of the held-out documents, once, in batches of loop.batch_size rows (this
  process's rows; the last batch filled up with masked rows), in held_out_batches' order."""
  shard, count = sharding.data_shard(mesh, loop.batch_size) if mesh is not None else (0, 1)
  for b in pipeline.packed_dataset(eval_docs, loop.seq_len, loop.batch_size, EVAL_SEED,
                                   shard_index=shard, shard_count=count, num_epochs=1,
                                   drop_remainder=False):
    yield pipeline.to_batch(b)


def _progress(total: int, start: int):
  if sys.stdout.isatty():
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
  return None


EVAL_SEED = 0  # the shuffle of the held-out documents that the evaluated batches come from


def train(model, train_docs: list[np.ndarray], eval_docs: list[np.ndarray],
          loop: LoopConfig, opt: optim.OptimConfig, workdir: str,
          mesh: jax.sharding.Mesh | None = None, meta: dict[str, Any] | None = None,
          resume_step: int | None = None) -> dict:
  """Trains `model` in place; resumes from workdir/checkpoints if a checkpoint exists.

  With `mesh` (model params already on it) the optimizer state is created sharded like
  the params, every process feeds its devices' rows of each global batch, and the steps
  run with the mesh in context (expert-parallel MoE when mesh.expert > 1); every process
  of a multi-host run calls this. Returns the last logged metrics (with the final eval
  loss). Raises FloatingPointError on a NaN/Inf loss, leaving the last good checkpoint.
  """
  if mesh is None and jax.process_count() > 1:
    raise ValueError(f"{jax.process_count()} processes: training needs a mesh over all devices")
  if mesh is not None:
    sharding.check_batch(loop.batch_size // loop.grad_accum, mesh)  # a microbatch's rows
    nnx.update(model, sharding.place_state(nnx.state(model), mesh))  # no-op if already there
  optimizer = step_lib.make_optimizer(model, opt, mesh)
  shard, count = sharding.data_shard(mesh, loop.batch_size) if mesh is not None else (0, 1)
  data_iter = iter(pipeline.packed_dataset(train_docs, loop.seq_len, loop.batch_size, loop.seed,
                                           shard_index=shard, shard_count=count))
  eval_set = held_out_batches(eval_docs, loop, mesh)
  mngr = train_ckpt.manager(workdir, loop.keep)
  state = nnx.state((model, optimizer))
  start = (mngr.latest_step() or 0) if resume_step is None else resume_step
  if start:
    start = _restore_good(mngr, start, state, data_iter, mesh)
    nnx.update((model, optimizer), state)
    logging.info("resumed from step %d", start)
  meta = dict(meta or {}, format="moe_jax.train", model=model.cfg.to_dict())
  writer = metrics_lib.MetricWriter(workdir, resumed_at=start)
  flops_per_token = flops.train_flops_per_token(model.cfg, loop.seq_len)
  peak = flops.peak_flops_per_device()
  key = jax.random.key(loop.seed)
  lr_at = jax.jit(optim.schedule(opt))  # the step's LR argument, one small program
  bar = _progress(loop.steps, start) if jax.process_index() == 0 else None
  last: dict[str, float] = {}
  t_last, tokens_since = time.time(), 0.0
  pending: list[tuple[int, dict]] = []  # (step, metrics on the device) not yet checked
  stop, done = False, start
  with Preempted() as preempted:
    for step in range(start, loop.steps):
      batch = pipeline.to_batch(next(data_iter))
      if step == loop.inject_nan_at_step:
        batch["loss_mask"] = batch["loss_mask"] * np.float32("nan")
      lr = lr_at(step)
      with _in_mesh(mesh):
        m = step_lib.train_step(model, optimizer,
                                _batch_to_device(batch, mesh, loop.batch_size),
                                jax.random.fold_in(key, step), lr, accum=loop.grad_accum)
      done = step + 1
      pending.append((done, m))
      log = done % loop.log_every == 0 or done == loop.steps
      save = done % loop.ckpt_every == 0 or done == loop.steps or preempted.flag
      if not (log or save or bar is not None):
        continue  # metrics stay on the device; the next step is dispatched at once
      tokens, bad = check_steps(pending)
      pending = []
      if bad:
        mngr.wait_until_finished()
        writer.close()
        raise FloatingPointError(
            f"{bad}; stopped, this step not saved. Last good checkpoint: "
            f"{mngr.latest_step() or 'none'} in {mngr.directory}")
      tokens_since += tokens
      loss = float(m["loss"])
      if log:
        dt = max(time.time() - t_last, 1e-9)
        tps = tokens_since / dt
        last = {"loss": loss, "ce": float(m["ce"]), "aux_loss": float(m["aux_loss"]),
                "z_loss": float(m["z_loss"]), "grad_norm": float(m["grad_norm"]),
                "lr": float(lr), "tokens_per_s": tps}
        if peak:
          last["mfu"] = tps * flops_per_token / (peak * jax.device_count())
        router = {kind: jax.device_get(m[kind]) for kind in ("moe", "moa")}
        loads = {}
        for kind, stats in router.items():
          last.update(metrics_lib.router_summary(stats, kind))
          loads.update(metrics_lib.router_loads(stats, kind))
        if eval_set and (done % loop.eval_every == 0 or done == loop.steps):
          last.update(evaluate_batches(model, eval_set, mesh, loop.batch_size))
        writer.write(done, last, loads)
        if bar is None:
          logging.info("step %d/%d loss=%.4f%s", done, loop.steps, loss,
                       f" eval_loss={last['eval_loss']:.4f}" if "eval_loss" in last else "")
        t_last, tokens_since = time.time(), 0.0
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
      stop = preempted.flag  # read once: a SIGTERM after this line is seen next step
      if save or stop:  # every step up to `done` has been checked by now
        _save(mngr, done, nnx.state((model, optimizer)), data_iter, meta,
              loop.batch_size * loop.seq_len, force=stop)
      if stop:
        logging.warning("SIGTERM: saved step %d, exiting", done)
        break
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  if bar is not None:
    bar.close()
  if stop and done < loop.steps:
    raise errors.Stopped(f"SIGTERM: saved step {done} of {loop.steps} in {mngr.directory}; "
                         "the same command resumes")
  return last
