"""Streaming dense -> MoE conversion: tensors in (HF names, one at a time), checkpoint
items out: each top-level tensor as soon as it arrives, each layer once complete, with its
experts as ExpertStacks that the writer saves one expert at a time. Peak memory stays
near one dense layer plus one expert, not the MoE layer."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from moe_jax import checkpoint, sharding
from moe_jax.config import ModelConfig
from moe_jax.convert import hf_names
from moe_jax.models import llama
from moe_jax.moe.config import MoeConfig
from moe_jax.stacked import ExpertStack
from moe_jax.upcycle import methods, router_init

_FFN = {"w_gate": 0, "w_up": 1, "w_down": 2}


def moe_model_config(dense: ModelConfig, spec: methods.UpcycleSpec, layers: str = "all",
                     **moe_overrides) -> ModelConfig:
  """The upcycled model's config: the dense one plus an MoE section."""
  spec.validate(dense.ffn_dim)
  moe = MoeConfig(num_experts=spec.num_experts, top_k=spec.top_k,
                  expert_dim=spec.expert_dim(dense.ffn_dim), router=spec.router,
                  norm_topk_prob=spec.norm_topk_prob,
                  shared_expert_dim=dense.ffn_dim if spec.shared_expert else 0,
                  layers=layers, **moe_overrides)
  return dense.replace(moe=moe)


def _expected_paths(cfg: ModelConfig) -> dict[Any, set[tuple]]:
  """For 'root' and each layer index, the param sub-paths a checkpoint item must hold."""
  state = nnx.state(llama.abstract(cfg))
  out: dict[Any, set[tuple]] = {}
  for path, _ in nnx.to_flat_state(state):
    key, sub = (path[1], path[2:]) if path[0] == "layers" else ("root", path)
    out.setdefault(key, set()).add(sub)
  return out


@dataclasses.dataclass
class Upcycler:
  """Turns one dense layer's FFN into its MoE params; routers come from `routers` (per
  layer, e.g. k-means) or are drawn by `router_kind`."""
  spec: methods.UpcycleSpec
  moe_cfg: ModelConfig
  router_kind: str = "normal"
  router_std: float = 0.02
  seed: int = 0
  routers: dict[int, np.ndarray] | None = None

  def layer(self, i: int, dense: methods.DenseFfn) -> dict[tuple, np.ndarray]:
    rng = np.random.default_rng([self.seed, i])
    experts = methods.METHODS[self.spec.method](dense, self.spec, rng)
    if isinstance(dense, list):  # merge, bam: one dense FFN per source (moe_jax/upcycle/merge.py)
      dense = dense[0]
    d = dense.w_gate_DxF.shape[0]
    if self.routers is not None and i in self.routers:
      router = self.routers[i]
    else:
      router = router_init.init_router(self.router_kind, d, self.spec.num_experts, rng,
                                       std=self.router_std, repeat=experts.router_repeat)
    router_init.check_conditioning(router, experts.router_repeat, name=f"layer {i} router")
    out = {("mlp", "w_gate"): experts.w_gate_ExDxF, ("mlp", "w_up"): experts.w_up_ExDxF,
           ("mlp", "w_down"): experts.w_down_ExFxD, ("mlp", "router"): router}
    if self.spec.router == "sigmoid_bias":
      out[("mlp", "router_bias")] = np.zeros(self.spec.num_experts, np.float32)
    if self.spec.shared_expert:
      out.update({("mlp", "shared_w_gate"): dense.w_gate_DxF,
                  ("mlp", "shared_w_up"): dense.w_up_DxF,
                  ("mlp", "shared_w_down"): dense.w_down_FxD})
    return {k: v.astype(np.float32) if isinstance(v, ExpertStack) else np.asarray(v, np.float32)
            for k, v in out.items()}


def upcycle_items(dense_cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray, str]],
                  upcycler: Upcycler) -> Iterator[tuple[str, dict]]:
  """Checkpoint items of the upcycled model: 'root.<name>' for each non-layer tensor as it
  arrives, 'layer_007' as soon as all of that layer's tensors have streamed in."""
  moe_cfg = upcycler.moe_cfg
  moe_ids = set(moe_cfg.moe_layer_ids)
  expected = _expected_paths(moe_cfg)
  pending: dict[Any, dict[tuple, np.ndarray]] = {}
  root_seen: set[tuple] = set()
  ffn: dict[int, list] = {}
  source = "checkpoint"
  for name, w, source in tensors:
    m = hf_names.match_stream(dense_cfg, name, source)
    if m is None:
      continue
    key, sub = (m.path[1], m.path[2:]) if m.path[0] == "layers" else ("root", m.path)
    if key not in expected:
      raise ValueError(f"{source}: tensor {name!r} is beyond the model's {dense_cfg.n_layers} layers")
    if key == "root":
      root_seen.add(sub)
      yield "root." + ".".join(map(str, sub)), traverse_util.unflatten_dict({sub: np.asarray(m.rule.to_ours(w), np.float32)})
      continue
    if key in moe_ids and sub[0] == "mlp":
      parts = ffn.setdefault(key, [None, None, None])
      parts[_FFN[sub[1]]] = m.rule.to_ours(w)
      if all(p is not None for p in parts):
        pending.setdefault(key, {}).update(upcycler.layer(key, methods.DenseFfn(*ffn.pop(key))))
    else:
      pending.setdefault(key, {})[sub] = np.asarray(m.rule.to_ours(w), np.float32)
    if key in pending and set(pending[key]) >= expected[key]:
      yield f"layer_{key:03d}", traverse_util.unflatten_dict(pending.pop(key))
  incomplete = sorted(set(pending) | set(ffn))
  root_missing = expected["root"] - root_seen
  if incomplete or root_missing:
    layer = incomplete[0] if incomplete else None
    what = (f"layer {layer}: {sorted(expected[layer] - set(pending.get(layer, {})))[0]}"
            if layer is not None else f"{sorted(root_missing)[0]}")
    raise ValueError(f"{source}: incomplete checkpoint, missing {what}")


def upcycle_model(src, spec: methods.UpcycleSpec, layers: str = "all", router_init: str = "normal",
                  router_std: float = 0.02, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                  **moe_overrides) -> llama.Transformer:
  """The MoE that `spec` makes of the dense checkpoint `src` (a `load.Source`), in memory:
  the same streaming conversion as the upcycle binary, without writing a checkpoint."""
  moe_cfg = moe_model_config(src.cfg, spec, layers, **moe_overrides)
  upcycler = Upcycler(spec, moe_cfg, router_init, router_std, seed)
  return model_from_items(moe_cfg, upcycle_items(src.cfg, src.tensors(), upcycler), mesh)


def model_from_items(cfg: ModelConfig, items: Iterable[tuple[str, dict]],
                     mesh: jax.sharding.Mesh | None = None) -> llama.Transformer:
  """A model from checkpoint items (the train binary's on-the-fly upcycle and merge),
  placed on `mesh` as the items stream in. An expert stack is built shard by shard: each
  process builds only the experts its devices hold (NeMo's online upcycling, per host),
  never the whole MoE layer in host memory."""
  graphdef, state = nnx.split(llama.abstract(cfg))
  target = traverse_util.flatten_dict(sharding.abstract_arrays(state, mesh))
  flat = {}
  for name, tree in items:
    prefix = checkpoint.scope_prefix(name)
    for p, v in traverse_util.flatten_dict(tree).items():
      if prefix + p not in target:
        raise ValueError(f"item {name}: {'/'.join(map(str, p))} is not a param of the model")
      t = target[prefix + p]
      flat[prefix + p] = (sharding.array_from_experts(t, v.expert) if isinstance(v, ExpertStack)
                          else sharding.array_from_host(t, v))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)
