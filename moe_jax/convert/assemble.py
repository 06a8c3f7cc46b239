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
  """Builds the model, placing each param (sharded over `mesh` if given) once complete.

  `tensors` yields (HF name, array, source file). Per-expert HF tensors are stacked
  into their [E, ...] param. Unknown names, wrong shapes and missing params raise
  ValueError naming the file and tensor.
  """
  graphdef, state = nnx.split(llama.abstract(cfg))
  targets = dict(nnx.to_flat_state(state))
  filled: dict = {}
  partial: dict = {}  # path -> (buffer, set of expert indices seen)
  source = "checkpoint"
  for name, w, source in tensors:
    m = hf_names.match_stream(cfg, name, source)
    if m is None:
      continue
    var = targets.get(m.path)
    shape = None if var is None else var.get_value().shape
    if var is None or (m.expert is not None and (len(shape) < 3 or m.expert >= shape[0])):
      raise ValueError(f"{source}: unexpected tensor {name!r} for this config")
    expected = hf_names.hf_shape(m.rule, shape if m.expert is None else shape[1:])
    if tuple(w.shape) != expected:
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(w.shape)}, expected {expected}")
    value = m.rule.to_ours(w)
    if m.expert is None:
      filled[m.path] = _place(value, var, mesh)
      continue
    buf, seen = partial.setdefault(m.path, (np.zeros(shape, np.float32), set()))
    buf[m.expert] = value
    seen.add(m.expert)
    if len(seen) == shape[0]:
      filled[m.path] = _place(partial.pop(m.path)[0], var, mesh)
  missing = [p for p in targets if p not in filled]
  if missing:
    path = missing[0]
    seen = partial.get(path, (None, set()))[1]
    expert = min(set(range(targets[path].get_value().shape[0])) - seen) if path in partial else None
    raise ValueError(f"{source}: missing tensor {_name(cfg, path, expert)!r} "
                     f"({len(missing)} params incomplete)")
  for path, var in targets.items():
    var.set_value(filled[path])
  return nnx.merge(graphdef, nnx.from_flat_state(targets))


def _place(value: np.ndarray, var: nnx.Variable, mesh) -> jax.Array:
  dtype = var.get_value().dtype
  if mesh is None:
    return jnp.asarray(value, dtype=dtype)
  return jax.device_put(value.astype(dtype), sharding.variable_sharding(var, mesh))


def _name(cfg: ModelConfig, path, expert) -> str:
  for e in (expert, 0):
    try:
      return hf_names.hf_name(cfg, path, e)
    except KeyError:
      continue
  return "/".join(map(str, path))
