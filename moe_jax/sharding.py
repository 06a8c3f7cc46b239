"""The one place that maps logical axis names to mesh axes (STYLE.md #6).

Params carry logical names such as ("embed", "mlp") or ("expert", "embed", "mlp");
activations are constrained with the same names. `LOGICAL_RULES` maps each name to
mesh axes of a mesh with axes ("data", "fsdp", "expert", "tensor").
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    # The expert axis also shards what has no expert dimension (attention, embedding,
    # dense FFNs, router), as MaxText does: without it every device of an expert mesh holds
    # a whole replica of them. An expert weight's own "expert" dim takes that axis first.
    ("embed", ("fsdp", "expert")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("expert", "expert"),
    ("norm", None),
    ("layers", None),  # the stacked layers' axis in training (models/layer_stack.py)
)


def logical_to_spec(names: Sequence[str | None] | None, rules=LOGICAL_RULES,
                    mesh_axes: Sequence[str] = MESH_AXES,
                    mesh_shape: dict[str, int] | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for logical axis names.

  Mesh axes absent from the mesh are dropped; given `shape` and `mesh_shape`, a mesh
  axis of size 1 or one that does not divide its dimension is dropped too (a dimension
  left with none replicates), so a spec names only the axes that split it.
  """
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in enumerate(names):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in mesh_axes and a not in used)
    if shape is not None and mesh_shape is not None:
      kept, size = [], 1
      for a in axes:
        if mesh_shape[a] > 1 and shape[dim] % (size * mesh_shape[a]) == 0:
          kept.append(a)
          size *= mesh_shape[a]
      axes = tuple(kept)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def variable_sharding(v: nnx.Variable, mesh: jax.sharding.Mesh | None) -> jax.sharding.Sharding:
  """Where a variable lives: this process's first device without a mesh, else its
  logical names mapped."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  names = v.get_metadata().get("out_sharding")
  spec = logical_to_spec(names, LOGICAL_RULES, mesh.axis_names, dict(mesh.shape),
                         v.get_value().shape)
  return NamedSharding(mesh, spec)


def abstract_arrays(state: nnx.State, mesh: jax.sharding.Mesh | None) -> dict:
  """Pure dict of ShapeDtypeStructs with concrete shardings: an orbax restore target."""
  def one(v):
    value = v.get_value()
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=variable_sharding(v, mesh))
  return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def array_from_experts(t: jax.ShapeDtypeStruct, expert: Callable[[int], np.ndarray]) -> jax.Array:
  """The [E, ...] array of `t` (shape, dtype, sharding) from `expert(e)`, built shard by
  shard: this process calls `expert` only for the experts in its devices' slices of axis
  0, each at most once (a block needs the slice, then the expert is dropped)."""
  cache: dict[int, np.ndarray] = {}
  local = [index[0] for index in t.sharding.addressable_devices_indices_map(t.shape).values()]
  uses = {e: sum(e in range(*i.indices(t.shape[0])) for i in local) for e in range(t.shape[0])}

  def get(e: int) -> np.ndarray:
    if e not in cache:
      cache[e] = np.asarray(expert(e), t.dtype)
    w = cache[e]
    uses[e] -= 1
    if not uses[e]:
      del cache[e]
    return w

  def block(index: tuple[slice, ...]) -> np.ndarray:
    experts = range(*index[0].indices(t.shape[0]))
    return np.stack([get(e)[tuple(index[1:])] for e in experts])

  return jax.make_array_from_callback(t.shape, t.sharding, block)


def array_from_host(t: jax.ShapeDtypeStruct, value) -> jax.Array:
  """A host array (replicated in every process) as `t`'s sharded array: each process
  puts only its devices' blocks."""
  value = np.asarray(value, t.dtype)
  if value.shape != t.shape:
    raise ValueError(f"array of shape {value.shape}, expected {t.shape}")
  return jax.make_array_from_callback(t.shape, t.sharding, lambda index: value[index])


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, LOGICAL_RULES, mesh.axis_names))


def resolve_mesh_shape(n_devices: int, data: int = 1, fsdp: int = 1, expert: int = 1,
                       tensor: int = 1) -> dict[str, int]:
  """Axis sizes with at most one -1 replaced by the rest of the `n_devices`.

  Raises a one-line ValueError naming the axis on a bad size, on a -1 that does not
  divide evenly, and on a mesh larger than the device count.
  """
  shape = dict(zip(MESH_AXES, (data, fsdp, expert, tensor)))
  for axis, size in shape.items():
    if not isinstance(size, int) or size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size!r}: expected a positive integer or -1 (the rest)")
  rest = [a for a, s in shape.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f"mesh.{rest[1]}=-1: only one axis may be -1 (mesh.{rest[0]} is too)")
  fixed = math.prod(s for s in shape.values() if s != -1)
  if rest:
    if n_devices % fixed:
      others = " x ".join(f"mesh.{a}={s}" for a, s in shape.items() if s > 1) or "1"
      raise ValueError(f"mesh.{rest[0]}=-1: the other axes ({others} = {fixed} devices) do "
                       f"not divide the {n_devices} devices")
    shape[rest[0]] = n_devices // fixed
  size = math.prod(shape.values())
  if size > n_devices:
    big = max(shape, key=shape.get)
    raise ValueError(f"mesh.{big}={shape[big]}: mesh {_fmt(shape)} needs {size} devices, "
                     f"have {n_devices}")
  return shape


def _fmt(shape: dict[str, int]) -> str:
  return "x".join(f"{a}={s}" for a, s in shape.items())


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices=None) -> jax.sharding.Mesh:
  """A mesh over MESH_AXES (Auto axis types: constraints are hints, not asserts); one
  axis may be -1 for the rest of the devices. With several processes the mesh must
  span every device (each process feeds its own devices)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(len(devices), data, fsdp, expert, tensor)
  size = math.prod(shape.values())
  if size < len(devices) and jax.process_count() > 1:
    raise ValueError(f"mesh {_fmt(shape)} uses {size} of {len(devices)} devices; with "
                     f"{jax.process_count()} processes it must use all (set one axis to -1)")
  if size < len(devices):
    logging.warning("mesh %s uses %d of the %d devices (set one axis to -1 to use all)",
                    _fmt(shape), size, len(devices))
  return jax.make_mesh(tuple(shape.values()), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=devices[:size])


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (data, fsdp, expert)."""
  axes = logical_to_spec(("batch",), mesh_axes=mesh.axis_names)[0] or ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, key: str = "config.loop.batch_size"
                ) -> None:
  """One-line error when the batch does not split evenly over the batch axes."""
  axes = batch_axes(mesh)
  n = math.prod(mesh.shape[a] for a in axes)
  if batch_size % n:
    raise ValueError(f"{key}={batch_size} is not divisible by the {n} devices of the batch "
                     f"axes ({' x '.join(f'mesh.{a}={mesh.shape[a]}' for a in axes)})")


def data_shard(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
  """(shard_index, shard_count): which contiguous slice of each global batch this
  process's devices hold. Processes that share batch rows (a `tensor` axis spanning
  hosts) get the same index."""
  spec = logical_to_spec(("batch",), mesh_axes=mesh.axis_names)
  rows = {idx[0].indices(batch_size)[:2] for idx in
          NamedSharding(mesh, spec).addressable_devices_indices_map((batch_size,)).values()}
  start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
  if sum(b - a for a, b in rows) < stop - start or batch_size % (stop - start):
    raise ValueError(f"mesh {_fmt(dict(mesh.shape))}: process {jax.process_index()} holds "
                     "batch rows that are not one contiguous slice")
  return start // (stop - start), batch_size // (stop - start)


# Initialisers run once: XLA:CPU compiles a model's RNG code ~6x faster unoptimised
# (2.3 s instead of 14 s for a 2-layer MoE), values equal to float rounding (1e-8).
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0,
                                  "xla_llvm_disable_expensive_passes": True}}


def init_sharded(fn: Callable[..., Any], mesh: jax.sharding.Mesh | None, *args) -> Any:
  """`fn(*args)` (an nnx object) built under jit with each variable's output placed where
  its logical names say on `mesh`: nothing is materialised whole on one device first.
  `args` (e.g. the model, for an optimizer) are nnx objects or arrays passed into the jit."""
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(fn, *args))
  out = nnx.to_pure_dict(jax.tree.map(lambda v: variable_sharding(v, mesh), state,
                                      is_leaf=lambda x: isinstance(x, nnx.Variable)))
  arg_def, arg_state = nnx.split(args)

  def build(arg_state):
    with nnx.use_eager_sharding(False):
      return nnx.to_pure_dict(nnx.state(fn(*nnx.merge(arg_def, arg_state))))

  options = _INIT_COMPILER_OPTIONS.get(jax.default_backend(), {})
  compiled = jax.jit(build, out_shardings=out).lower(arg_state).compile(options)
  nnx.replace_by_pure_dict(state, compiled(arg_state))
  return nnx.merge(graphdef, state)


def bytes_per_device(tree) -> dict[jax.Device, int]:
  """Bytes of every array in `tree` held by each addressable device."""
  out: dict[jax.Device, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in getattr(x, "addressable_shards", ()):
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def place_state(state: nnx.State, mesh: jax.sharding.Mesh | None) -> nnx.State:
  """`state` with every variable moved to where its logical names say on `mesh` (a no-op
  for arrays already there)."""
  return jax.tree.map(
      lambda v: v.replace(jax.device_put(v.get_value(), variable_sharding(v, mesh))), state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(model: nnx.Module, mesh: jax.sharding.Mesh | None) -> nnx.Module:
  """The model with every variable moved to where its logical names say on `mesh`."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, place_state(state, mesh))
