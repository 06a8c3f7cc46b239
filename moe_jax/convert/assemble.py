"""Fill a model's params from a stream of (HF name, array) pairs, one tensor at a time."""
from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.convert import hf_names
from moe_jax.models import llama


def model_from_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray, str]],
                       mesh: jax.sharding.Mesh | None = None) -> llama.Transformer:
  """Builds the model, placing each tensor (sharded over `mesh` if given) as it arrives.

  `tensors` yields (HF name, array, source file). Unknown names, wrong shapes and
  missing params raise ValueError naming the file and tensor.
  """
  graphdef, state = nnx.split(llama.abstract(cfg))
  targets = dict(nnx.to_flat_state(state))
  filled: dict = {}
  last_source = "checkpoint"
  for name, w, source in tensors:
    last_source = source
    if cfg.tie_embeddings and name == "lm_head.weight":
      continue  # some tied checkpoints store the head anyway
    try:
      path = hf_names.hf_to_path(cfg, name)
    except KeyError:
      raise ValueError(f"{source}: unexpected tensor {name!r} for a {cfg.arch} model") from None
    if path is None:
      continue
    if path not in targets:
      raise ValueError(f"{source}: unexpected tensor {name!r} for this config ({path})")
    var = targets[path]
    expected = hf_names.hf_shape(cfg, path, var.get_value().shape)
    if tuple(w.shape) != expected:
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(w.shape)}, expected {expected}")
    value = hf_names.to_ours(cfg, path, w)
    filled[path] = _place(value, var, mesh)
  missing = [p for p in targets if p not in filled]
  if missing:
    name = _hf_name(cfg, missing[0])
    raise ValueError(f"{last_source}: missing tensor {name!r} ({len(missing)} params missing)")
  for path, var in targets.items():
    var.set_value(filled[path])
  return nnx.merge(graphdef, nnx.from_flat_state(targets))


def _place(value: np.ndarray, var: nnx.Variable, mesh) -> jax.Array:
  dtype = var.get_value().dtype
  if mesh is None:
    return jnp.asarray(value, dtype=dtype)
  return jax.device_put(value.astype(dtype), sharding.variable_sharding(var, mesh))


def _hf_name(cfg: ModelConfig, path) -> str:
  try:
    return hf_names.path_to_hf_name(cfg, path)
  except KeyError:
    return "/".join(map(str, path))
