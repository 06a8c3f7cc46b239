"""Layers stored stacked for lax.scan (cfg.scan_layers in training), and the scan itself.

Everywhere a model lives outside the train step (checkpoints, conversion, analysis,
decoding) its layers are a list of Blocks. Training with cfg.scan_layers stores them
stacked instead, MaxText's layout: `stack_layers(model)` replaces `model.layers` by a
LayerStack whose unit j holds layers j, j+p, ..., j+(r-1)p with every variable stacked on
a leading "layers" axis (p = scan_period, the shortest repeating run of layer structures;
r = n_layers // p), and whose tail holds the last n_layers - r*p layers as they are. The
train step then scans straight over the stored params: no [r, ...] copy of the params or
of their gradients is made inside it.

Checkpoints stay per layer (`unstack_tree` before a save, `stack_tree` after a restore),
so a run saved with or without scan_layers resumes, loads and exports either way.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"  # the logical name of the stacked axis (replicated: sharding.py)

# cfg.remat -> the jax.checkpoint policy of each block in training ('none': no remat).
REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.checkpoint_dots}


def scan_period(graphdefs: Sequence) -> int:
  """The shortest unit of consecutive layers whose structure repeats through the whole
  stack (1 for identical layers, 2 for MoE every:2, ...), given each layer's nnx graphdef;
  0 when no unit repeats at least twice (nothing to scan)."""
  n = len(graphdefs)
  for p in range(1, n // 2 + 1):
    if all(graphdefs[i] == graphdefs[i % p] for i in range(n)):
      return p
  return 0


def scan(graphdefs: Sequence, stacked: Sequence, x_BxLxD, positions_BxL, mask, inv_freq,
         key, train: bool, remat: str):
  """Runs r units of p blocks as one lax.scan: unit position j is graphdefs[j] with the
  variables stacked[j] ([r, ...] leaves), layer u*p + j takes slice u, and layer i's key is
  fold_in(key, i) as in the Python loop. The body (one unit) is compiled once and, in
  training, recomputed in the backward pass under `remat`'s policy. Returns (x, moe stats,
  attention-expert stats), each stats dict keyed by layer id."""
  p = len(graphdefs)
  r = jax.tree.leaves(stacked)[0].shape[0]
  keys = None
  if key is not None:
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(r * p))
    keys = keys.reshape(r, p, *keys.shape[1:])  # typed or raw keys

  def unit(x_BxLxD, xs):
    unit_states, unit_keys = xs
    stats = []
    for j in range(p):
      block = nnx.merge(graphdefs[j], unit_states[j])
      x_BxLxD, moe, moa, _ = block(x_BxLxD, positions_BxL, mask, inv_freq, train=train,
                                   key=None if unit_keys is None else unit_keys[j])
      stats.append((moe, moa))
    return x_BxLxD, stats

  if remat != "none" and train:
    unit = jax.checkpoint(unit, policy=REMAT_POLICIES[remat])
  x_BxLxD, stats = jax.lax.scan(unit, x_BxLxD, (list(stacked), keys))
  moe_stats, moa_stats = {}, {}
  for u in range(r):
    for j, (moe, moa) in enumerate(stats):
      if moe:
        moe_stats[u * p + j] = jax.tree.map(lambda a, u=u: a[u], moe)
      if moa:
        moa_stats[u * p + j] = jax.tree.map(lambda a, u=u: a[u], moa)
  return x_BxLxD, moe_stats, moa_stats


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _names(names) -> dict:
  return {} if names is None else {"out_sharding": names}


def stack_states(states: Sequence[nnx.State]) -> nnx.State:
  """One state of the blocks' `states` (same structure), each variable stacked on a
  leading axis named LAYERS_AXIS."""
  def one(*vs):
    names = vs[0].get_metadata().get("out_sharding")
    names = None if names is None else (LAYERS_AXIS, *names)
    return vs[0].replace(jnp.stack([v.get_value() for v in vs]), **_names(names))
  with nnx.use_eager_sharding(False):
    return jax.tree.map(one, *states, is_leaf=_is_variable)


def unstack_state(state: nnx.State, u: int) -> nnx.State:
  """Slice `u` of a stack_states state: one block's variables, as they were."""
  def one(v):
    names = v.get_metadata().get("out_sharding")
    return v.replace(v.get_value()[u], **_names(None if names is None else names[1:]))
  with nnx.use_eager_sharding(False):
    return jax.tree.map(one, state, is_leaf=_is_variable)


class LayerStack(nnx.Module):
  """A model's blocks stored for the scan: `units[j]` holds blocks j, j+p, ... stacked
  (r of them), `tail` the blocks after the last whole unit."""

  def __init__(self, blocks: Sequence[nnx.Module]):
    graphdefs, states = zip(*(nnx.split(b) for b in blocks))
    p = scan_period(graphdefs)
    r = len(blocks) // p if p else 0
    self.period, self.repeats = p, r
    self.units = nnx.List([nnx.merge(graphdefs[j], stack_states(states[j:r * p:p]))
                           for j in range(p)])
    self.tail = nnx.List(list(blocks[r * p:]))

  def scan(self, x_BxLxD, positions_BxL, mask, inv_freq, key, train: bool, remat: str):
    """(x, moe stats, moa stats, number of layers run): the units' layers, scanned over
    the stored stacks; the caller runs `tail` after them."""
    if not self.period:
      return x_BxLxD, {}, {}, 0
    graphdefs, stacked = zip(*(nnx.split(u) for u in self.units))
    return (*scan(graphdefs, stacked, x_BxLxD, positions_BxL, mask, inv_freq, key, train,
                  remat), self.period * self.repeats)

  def blocks(self) -> list[nnx.Module]:
    """Every block in layer order, each with its own (unstacked) variables."""
    split = [nnx.split(u) for u in self.units]
    p = self.period
    scanned = [nnx.merge(split[i % p][0], unstack_state(split[i % p][1], i // p))
               for i in range(p * self.repeats)]
    return scanned + list(self.tail)

  def groups(self) -> Iterator[tuple[nnx.Module, tuple[int, ...] | int]]:
    """(module, layer ids) for each stacked unit (its variables' rows are those layers),
    then (block, layer id) for each block of the tail."""
    p, r = self.period, self.repeats
    for j, unit in enumerate(self.units):
      yield unit, tuple(u * p + j for u in range(r))
    for t, block in enumerate(self.tail):
      yield block, p * r + t


def groups(layers) -> Iterator[tuple[nnx.Module, tuple[int, ...] | int]]:
  """A model's blocks as (module, layer id) pairs, or (stacked unit, its layer ids)."""
  if isinstance(layers, LayerStack):
    yield from layers.groups()
  else:
    yield from ((block, i) for i, block in enumerate(layers))


def _copy(model: nnx.Module) -> nnx.Module:
  return nnx.merge(*nnx.split(model))


def stack_layers(model: nnx.Module) -> nnx.Module:
  """A copy of `model` whose `layers` are a LayerStack (the model's own is untouched; the
  layers' arrays are copied into the stacks)."""
  if isinstance(model.layers, LayerStack):
    return model
  out = _copy(model)
  out.layers = LayerStack(list(out.layers))
  return out


def unstack_layers(model: nnx.Module) -> nnx.Module:
  """A copy of `model` with its layers as a list of blocks again (`model` if they are)."""
  if not isinstance(model.layers, LayerStack):
    return model
  out = _copy(model)
  out.layers = nnx.List(out.layers.blocks())
  return out


# Pure dicts (nnx.to_pure_dict) of a model's or an optimizer's state, as checkpoints hold
# them: a LayerStack appears as {"layers": {"units": {j: ...}, "tail": {t: ...}}}, a list
# of blocks as {"layers": {i: ...}}.

def _is_stack(node) -> bool:
  return isinstance(node, dict) and bool(node) and set(node) <= {"units", "tail"}


def _period_repeats(stack: dict) -> tuple[int, int]:
  units = stack.get("units", {})
  leaves = jax.tree.leaves(units)
  return len(units), (leaves[0].shape[0] if leaves else 0)


def _row(x, u: int):
  """Row u of an array, or of an abstract array (its sharding without the first axis)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    s = x.sharding
    if isinstance(s, jax.sharding.NamedSharding):
      s = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=s)
  return x[u]


def unstack_tree(tree):
  """`tree` with every stacked "layers" node as one entry per layer id (arrays sliced, or
  abstract arrays with their per-layer shapes and shardings): a per-layer model's layout."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k == "layers" and _is_stack(v):
      p, r = _period_repeats(v)
      layers = {u * p + j: jax.tree.map(lambda x, u=u: _row(x, u), v["units"][j])
                for u in range(r) for j in range(p)}
      layers.update({p * r + int(t): sub for t, sub in v.get("tail", {}).items()})
      out[k] = dict(sorted(layers.items()))
    else:
      out[k] = unstack_tree(v)
  return out


def stack_tree(tree, like):
  """The inverse of unstack_tree: `tree` (per layer) in the layout of `like`, the stacked
  tree it was unstacked from; stacked arrays go where `like`'s abstract arrays say."""
  if not isinstance(like, dict):
    return tree
  out = {}
  for k, v in like.items():
    if k == "layers" and _is_stack(v):
      p, r = _period_repeats(v)
      per_layer = tree[k]
      units = {j: jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[per_layer[u * p + int(j)] for u in range(r)])
               for j in v.get("units", {})}
      out[k] = {"units": jax.tree.map(_place, units, v.get("units", {}))} if units else {}
      if v.get("tail"):
        out[k]["tail"] = {t: per_layer[p * r + int(t)] for t in v["tail"]}
    else:
      out[k] = stack_tree(tree[k], v)
  return out


def _place(x, like):
  sharding = getattr(like, "sharding", None)
  return x if sharding is None else jax.device_put(x, sharding)
