"""moe_jax checkpoint directories: `moe_jax.json` (config + provenance), `params/` (orbax),
`tokenizer.json`. Written to a temporary sibling and renamed, so a failure leaves nothing.

`params/` holds orbax items named `<scope>[.<tag>]`. The scope is `root` (embeddings,
final norm, head) or `layer_007`, and says where the item's tree sits in the model; items
of one scope are merged. The tag `expert_003` marks one expert's slice of the scope's
stacked [E, ...] expert weights (`layer_007.expert_003.mlp.w_gate`: one matrix of one
expert per item), which the loader stacks again. Any other tag is just
more of the scope (the streaming converter writes each root tensor as it arrives).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from moe_jax import locks, sharding
from moe_jax.config import ModelConfig
from moe_jax.models import llama
from moe_jax.stacked import ExpertStack

MARKER = "moe_jax.json"


def versions() -> dict[str, str]:
  """Versions of the packages that wrote a checkpoint, for its provenance."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {}
  for pkg in ("jax", "flax", "orbax-checkpoint", "moe_jax"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MARKER))


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two existing paths (Linux renameat2 RENAME_EXCHANGE); False where
  the system cannot."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def clean_stale_temps(path: str) -> None:
  """Removes the temp dirs a killed writer of `path` left beside it (their writer's pid,
  in the name, is gone), and puts back an old copy set aside by an interrupted
  overwrite when `path` itself is missing."""
  parent, name = os.path.split(os.path.abspath(path))
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    m = re.fullmatch(re.escape(f".{name}.") + r"(tmp|old)-(\d+)-.*", entry)
    if not m or _alive(int(m.group(2))):
      continue
    stale = os.path.join(parent, entry)
    if m.group(1) == "old" and not os.path.exists(path):
      os.rename(stale, path)  # the overwrite died between its two renames
    else:
      shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temp dir beside `path` (holding its lock, moe_jax.locks); it becomes `path`
  only if the body succeeds. An overwrite swaps the two atomically where the OS can (else
  old aside, new in, old removed), so a kill at any moment leaves a complete old or a
  complete new `path`; what a killed writer left is cleaned by the next one."""
  path = os.path.abspath(path)
  with locks.hold(path):  # one writer per path
    clean_stale_temps(path)
    if os.path.exists(path) and os.listdir(path) and not overwrite:
      raise FileExistsError(f"{path}: exists and is not empty (pass overwrite to replace it)")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint is as readable as its parent
    try:
      yield tmp
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    if not os.path.exists(path):
      os.rename(tmp, path)
    elif _exchange(tmp, path):
      shutil.rmtree(tmp)  # now the old one
    else:
      aside = os.path.join(parent, f".{name}.old-{os.getpid()}-{os.urandom(4).hex()}")
      os.rename(path, aside)  # a kill from here to the next rename: clean_stale_temps restores
      os.rename(tmp, path)
      shutil.rmtree(aside)


def strict_json(obj: Any) -> Any:
  """`obj` with every NaN or infinite float as None: what JSON (RFC 8259) can hold."""
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  return obj


def write_text_atomic(path: str, text: str) -> None:
  """A text file written whole or not at all (a temp file, then a rename)."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:  # a failed write names no file
      raise OSError(e.errno, e.strerror, path) from e
    raise


def write_json_atomic(path: str, obj: Any) -> None:
  """Strict JSON (non-finite floats as null) written whole or not at all."""
  write_text_atomic(path, json.dumps(strict_json(obj), indent=2, sort_keys=True,
                                     allow_nan=False))


def split_items(pure: dict) -> Iterator[tuple[str, dict]]:
  """A model's pure state as orbax items: 'root' (embeddings, final norm, head) and one
  item per layer, so conversions can write a checkpoint one layer at a time."""
  yield "root", {k: v for k, v in pure.items() if k != "layers"}
  for i in sorted(pure.get("layers", {})):
    yield f"layer_{i:03d}", pure["layers"][i]


def _save_item(ckptr, params_dir: str, name: str, flat: dict[tuple, Any]) -> None:
  ckptr.save(os.path.join(params_dir, name), traverse_util.unflatten_dict(flat))
  ckptr.wait_until_finished()


def write_items(path: str, cfg: ModelConfig, items: Iterator[tuple[str, dict]], tokenizer=None,
                provenance: dict[str, Any] | None = None, overwrite: bool = False) -> None:
  """Writes a checkpoint from (item name, pure dict) pairs, each saved as it arrives;
  ExpertStack leaves are saved one expert per item, so only one expert is ever built."""
  with atomic_dir(path, overwrite) as tmp:
    params = os.path.join(tmp, "params")
    with ocp.StandardCheckpointer() as ckptr:
      for name, tree in items:
        flat = traverse_util.flatten_dict(tree)
        stacks = {p: v for p, v in flat.items() if isinstance(v, ExpertStack)}
        if len(stacks) < len(flat):
          _save_item(ckptr, params, name, {p: v for p, v in flat.items() if p not in stacks})
        for e in range(max((s.num_experts for s in stacks.values()), default=0)):
          for p, s in stacks.items():  # one matrix of one expert per item
            _save_item(ckptr, params, f"{name}.expert_{e:03d}.{'.'.join(map(str, p))}",
                       {p: s.expert(e)})
        del flat, stacks, tree
    meta = {"format": "moe_jax", "model": cfg.to_dict(), "provenance": provenance or {}}
    write_json_atomic(os.path.join(tmp, MARKER), meta)
    if tokenizer is not None:
      tokenizer.save(tmp)


def save(path: str, model: llama.Transformer, tokenizer=None,
         provenance: dict[str, Any] | None = None, overwrite: bool = False) -> None:
  """Saves config, all model variables and the tokenizer as one checkpoint directory."""
  pure = nnx.to_pure_dict(nnx.state(model))
  write_items(path, model.cfg, split_items(pure), tokenizer, provenance, overwrite)


def read_meta(path: str) -> dict[str, Any]:
  with open(os.path.join(path, MARKER)) as f:
    return json.load(f)


def scope_prefix(item: str, path: str = "checkpoint") -> tuple:
  """Where an item's tree sits in the model's state: () for root, ('layers', 7) for
  layer_007 (the tag after a '.' is ignored)."""
  scope = item.split(".")[0]
  if scope == "root":
    return ()
  if scope.startswith("layer_") and scope[6:].isdigit():
    return ("layers", int(scope[6:]))
  raise ValueError(f"{path}: unexpected checkpoint item {scope!r}")


_ITEM_FILES = ("_METADATA", "_CHECKPOINT_METADATA")  # what every orbax item holds


def _item_tree(ckptr, item: str) -> dict[tuple, Any]:
  """{path: metadata} of one orbax item; a one-line error naming it when it is damaged."""
  meta = None
  if all(os.path.isfile(os.path.join(item, f)) for f in _ITEM_FILES):  # else orbax warns
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
      meta = ckptr.metadata(item)
  tree = getattr(getattr(meta, "item_metadata", None), "tree", None)
  if tree is None:
    raise ValueError(f"{item}: orbax item metadata is missing or unreadable; expected a "
                     f"complete checkpoint item ({', '.join(_ITEM_FILES)})")
  return traverse_util.flatten_dict(tree)


def restore_flat(path: str, target: dict[tuple, jax.ShapeDtypeStruct],
                 scopes: set[str] | None = None) -> dict[tuple, jax.Array]:
  """Every param of a checkpoint directory as {full path: array}, placed as `target` says:
  a jax.ShapeDtypeStruct (shape, dtype, sharding) gives a jax.Array, expert slices
  stacked again on the devices (each process reads only the expert items its own devices
  hold); an np.ndarray is filled in place on the host, one expert at a time (no device
  copy: for analyses). With `scopes` (e.g. {'layer_007'}), only those items are read and
  `target` holds only their params."""
  params = os.path.join(os.path.abspath(path), "params")
  out: dict[tuple, Any] = {}
  slices: dict[tuple, dict[int, tuple[str, tuple]]] = {}  # stack path -> expert -> item
  with ocp.StandardCheckpointer() as ckptr:
    for name in sorted(os.listdir(params)):
      if scopes is not None and name.split(".")[0] not in scopes:
        continue
      tag = name.partition(".")[2]
      prefix, item = scope_prefix(name, path), os.path.join(params, name)
      stored = _item_tree(ckptr, item)
      unknown = [prefix + p for p in stored if prefix + p not in target]
      if unknown:
        raise ValueError(f"{path}: tensor {'/'.join(map(str, unknown[0]))} is not in the "
                         f"model config")
      if tag.startswith("expert_"):
        for p in stored:
          slices.setdefault(prefix + p, {})[int(tag.split(".")[0][7:])] = (item, p)
        continue
      want = traverse_util.unflatten_dict({p: target[prefix + p] for p in stored})
      out.update({prefix + p: a for p, a in
                  traverse_util.flatten_dict(ckptr.restore(item, want)).items()})
    for p, by_expert in slices.items():
      t = target[p]
      if sorted(by_expert) != list(range(t.shape[0])):
        raise ValueError(f"{path}: {'/'.join(map(str, p))} has expert slices "
                         f"{sorted(by_expert)}, expected 0..{t.shape[0] - 1}")
      out[p] = (_fill_experts(ckptr, by_expert, t) if isinstance(t, np.ndarray) else
                _stack_experts(ckptr, by_expert, t))
  missing = sorted(set(target) - set(out), key=str)
  if missing:
    raise ValueError(f"{path}: checkpoint lacks tensor {'/'.join(map(str, missing[0]))}")
  return out


def _fill_experts(ckptr, items: dict[int, tuple[str, tuple]], out: np.ndarray) -> np.ndarray:
  """`out` [E, ...] filled from the per-expert items, each read straight into host memory."""
  for e, (item, p) in items.items():
    want = traverse_util.unflatten_dict({p: np.empty(out.shape[1:], out.dtype)})
    out[e] = traverse_util.flatten_dict(ckptr.restore(item, want))[p]
  return out


def _stack_experts(ckptr, items: dict[int, tuple[str, tuple]], t: jax.ShapeDtypeStruct):
  """The [E, ...] stack of one param from its per-expert items, built shard by shard:
  a device's block reads only the experts in its slice of axis 0 (each at most once)."""
  def expert(e: int) -> np.ndarray:
    item, p = items[e]
    return traverse_util.flatten_dict(ckptr.restore(item))[p]

  return sharding.array_from_experts(t, expert)


def load(path: str, mesh: jax.sharding.Mesh | None = None, **cfg_overrides) -> llama.Transformer:
  """Restores a model saved by `save` or `write_items`, sharded over `mesh` when given."""
  cfg = ModelConfig.from_dict(read_meta(path)["model"]).replace(**cfg_overrides)
  graphdef, state = nnx.split(llama.abstract(cfg))
  target = traverse_util.flatten_dict(sharding.abstract_arrays(state, mesh))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(restore_flat(path, target)))
  return nnx.merge(graphdef, state)


def param_count(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
