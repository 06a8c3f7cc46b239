"""moe_jax checkpoint directories: `moe_jax.json` (config + provenance), `params/` (orbax),
`tokenizer.json`. Written to a temporary sibling and renamed, so a failure leaves nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.models import llama

MARKER = "moe_jax.json"


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MARKER))


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temp dir beside `path`; renames it to `path` only if the body succeeds."""
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f"{path}: exists and is not empty (pass overwrite to replace it)")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    shutil.rmtree(path)
  os.rename(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def split_items(pure: dict) -> Iterator[tuple[str, dict]]:
  """A model's pure state as orbax items: 'root' (embeddings, final norm, head) and one
  item per layer, so conversions can write a checkpoint one layer at a time."""
  yield "root", {k: v for k, v in pure.items() if k != "layers"}
  for i in sorted(pure.get("layers", {})):
    yield f"layer_{i:03d}", pure["layers"][i]


def write_items(path: str, cfg: ModelConfig, items: Iterator[tuple[str, dict]], tokenizer=None,
                provenance: dict[str, Any] | None = None, overwrite: bool = False) -> None:
  """Writes a checkpoint from (item name, pure dict) pairs, each saved as it arrives."""
  with atomic_dir(path, overwrite) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      for name, tree in items:
        ckptr.save(os.path.join(tmp, "params", name), tree)
        ckptr.wait_until_finished()
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


def load(path: str, mesh: jax.sharding.Mesh | None = None, **cfg_overrides) -> llama.Transformer:
  """Restores a model saved by `save`, sharded over `mesh` when given, item by item."""
  cfg = ModelConfig.from_dict(read_meta(path)["model"]).replace(**cfg_overrides)
  graphdef, state = nnx.split(llama.abstract(cfg))
  target = sharding.abstract_arrays(state, mesh)
  restored = {}
  with ocp.StandardCheckpointer() as ckptr:
    for name, tree in split_items(target):
      item = ckptr.restore(os.path.join(os.path.abspath(path), "params", name), tree)
      if name == "root":
        restored.update(item)
      else:
        restored.setdefault("layers", {})[int(name[len("layer_"):])] = item
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def param_count(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
