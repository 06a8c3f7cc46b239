"""The one place that maps logical axis names to mesh axes (STYLE.md #6).

Params carry logical names such as ("embed", "mlp") or ("expert", "embed", "mlp");
activations are constrained with the same names. `LOGICAL_RULES` maps each name to
mesh axes of a mesh with axes ("data", "fsdp", "expert", "tensor").
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("expert", "expert"),
    ("norm", None),
)


def logical_to_spec(names: Sequence[str | None] | None, rules=LOGICAL_RULES,
                    mesh_axes: Sequence[str] = MESH_AXES,
                    mesh_shape: dict[str, int] | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for logical axis names.

  Mesh axes absent from the mesh are dropped; given `shape` and `mesh_shape`, a mesh
  axis that does not divide its dimension is dropped too (that dimension replicates).
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
        if shape[dim] % (size * mesh_shape[a]) == 0:
          kept.append(a)
          size *= mesh_shape[a]
      axes = tuple(kept)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def variable_sharding(v: nnx.Variable, mesh: jax.sharding.Mesh | None) -> jax.sharding.Sharding:
  """Where a variable lives: one device without a mesh, else its logical names mapped."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
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


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, LOGICAL_RULES, mesh.axis_names))


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices=None) -> jax.sharding.Mesh:
  """A mesh over MESH_AXES (Auto axis types: constraints are hints, not asserts)."""
  shape = (data, fsdp, expert, tensor)
  n = len(devices) if devices is not None else jax.device_count()
  size = data * fsdp * expert * tensor
  if size > n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {size} devices, have {n}")
  devices = list(devices if devices is not None else jax.devices())[:size]
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                       devices=devices)


def place(model: nnx.Module, mesh: jax.sharding.Mesh | None) -> nnx.Module:
  """The model with every variable moved to where its logical names say on `mesh`."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(
      lambda v: v.replace(jax.device_put(v.get_value(), variable_sharding(v, mesh))), state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)
