"""Training checkpoints: one orbax step per save, read by the training loop (resume) and,
through `moe_jax.convert.load`, by every tool that takes a checkpoint.

A step directory `<workdir>/checkpoints/<step>/` holds three items:
  state/  the pure dict of (model, optimizer) state: '0' the model, '1' the optimizer;
  data/   the grain iterator's position;
  meta/   JSON: the model config, the provenance and the step's counters.
The run's tokenizer is written once, as `<workdir>/tokenizer.json`. A step is finished
once orbax has renamed it into place and stamped its commit time; nothing else is read.
"""
from __future__ import annotations

import json
import os
import re

import grain
import orbax.checkpoint as ocp
from flax import traverse_util

CHECKPOINTS = "checkpoints"       # the steps' parent, inside a train workdir
MODEL_KEY = "0"                   # the model's subtree of the state item
_ORBAX_METADATA = "_CHECKPOINT_METADATA"


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The CheckpointManager the loop saves and resumes with (async, keeps `keep` steps)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                         create=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINTS), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, CHECKPOINTS))


def is_step_dir(path: str) -> bool:
  """A path of the form <workdir>/checkpoints/<step> (finished or not)."""
  path = os.path.abspath(path)
  return (os.path.basename(os.path.dirname(path)) == CHECKPOINTS
          and os.path.basename(path).isdigit())


def is_finished(step_dir: str) -> bool:
  """Orbax has committed the step: renamed into place, commit time stamped, items there."""
  meta = os.path.join(step_dir, _ORBAX_METADATA)
  if not (os.path.isfile(meta) and os.path.isdir(os.path.join(step_dir, "state"))
          and os.path.isdir(os.path.join(step_dir, "meta"))):
    return False
  try:
    with open(meta) as f:
      return json.load(f).get("commit_timestamp_nsecs") is not None
  except (OSError, ValueError):
    return False


def finished_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, CHECKPOINTS)
  names = os.listdir(root) if os.path.isdir(root) else []
  return sorted(int(n) for n in names if n.isdigit() and is_finished(os.path.join(root, n)))


def latest_step_dir(workdir: str) -> str | None:
  steps = finished_steps(workdir)
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS, str(steps[-1])) if steps else None


def resolve(path: str) -> str:
  """The finished step directory that `path` (a train workdir or one of its steps) names;
  a one-line error naming the path and what was expected otherwise."""
  path = os.path.abspath(path)
  if is_workdir(path):
    step_dir = latest_step_dir(path)
    if step_dir is None:
      raise ValueError(f"{path}: train workdir has no finished step (expected "
                       f"{CHECKPOINTS}/<step> written by a completed save)")
    return step_dir
  workdir, step = os.path.dirname(os.path.dirname(path)), os.path.basename(path)
  if not os.path.isdir(path):
    if _in_progress(os.path.dirname(path), step):
      raise ValueError(f"{path}: step {step} is still being written (an orbax temporary "
                       "directory exists); expected a finished step")
    raise FileNotFoundError(f"{path}: step {step} does not exist (finished steps: "
                            f"{finished_steps(workdir) or 'none'})")
  if not is_finished(path):
    raise ValueError(f"{path}: step {step} is not a finished checkpoint (no commit "
                     f"timestamp in {_ORBAX_METADATA}); expected a completed save")
  return path


def _in_progress(root: str, step: str) -> bool:
  pattern = re.compile(rf"{re.escape(step)}\{ocp.utils.TMP_DIR_SUFFIX}")
  return os.path.isdir(root) and any(pattern.match(n) for n in os.listdir(root))


def workdir_of(step_dir: str) -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))


def read_meta(step_dir: str) -> dict:
  """The step's meta item: {'model': ..., 'provenance': ..., 'step': ..., ...}."""
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    return json.load(f)


def restore_model(step_dir: str, target: dict) -> dict:
  """The model's pure state from a step, without its optimizer state: `target` is the
  model's pure dict of jax.ShapeDtypeStruct (with shardings), keyed as nnx.to_pure_dict."""
  flat = traverse_util.flatten_dict(target)
  item = {MODEL_KEY: traverse_util.unflatten_dict({tuple(map(str, p)): v
                                                   for p, v in flat.items()})}
  args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(item))
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(step_dir, "state"), args=args)[MODEL_KEY]
  by_str = traverse_util.flatten_dict(restored)
  return traverse_util.unflatten_dict({p: by_str[tuple(map(str, p))] for p in flat})
