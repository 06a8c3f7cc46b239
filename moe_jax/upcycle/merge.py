"""Several dense models into one MoE, streamed one layer at a time: BTX and BAM.

    merge (BTX, mergekit-moe): FFN expert j = source j's FFN; everything else averaged
                               (or taken from `base`).
    bam (BAM, Zhang et al. 2024): the same FFN experts, and in the attention-expert layers
                               attention expert j = source j's attention (with shared KV,
                               k and v averaged); norms and embeddings averaged; the
                               attention router drawn fresh like the FFN's.

Each step reads one layer of every source (Source.layer), so the sources are never whole
in memory: peak memory is N dense layers plus the merged one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from flax import traverse_util

from moe_jax.config import ModelConfig
from moe_jax.convert import load
from moe_jax.moe.attention import MoaConfig
from moe_jax.upcycle import convert, methods, router_init
from moe_jax.upcycle.convert import Upcycler

_FFN = ("w_gate", "w_up", "w_down")
_ATTN = ("wq", "wk", "wv", "wo")


def open_sources(paths: Sequence[str], spec: methods.UpcycleSpec, shared_kv: bool = False,
                 key: str = "config.merge_sources") -> list:
  """The dense checkpoints `paths` of a merge or bam (load.Source, one per expert),
  checked against `spec` and each other; one-line errors name `key`, the config key that
  listed them."""
  if not paths:
    raise ValueError(f"{key}: method={spec.method} needs one dense checkpoint per expert, "
                     "comma-separated")
  if len(paths) != spec.num_experts:
    raise ValueError(f"config.upcycle.num_experts={spec.num_experts}, but {key} names "
                     f"{len(paths)} checkpoints: expected one per expert")
  sources = [load.open_source(p) for p in paths]
  check_sources(sources, spec.method == "bam" and shared_kv)
  return sources


def merged_model_config(dense: ModelConfig, spec: methods.UpcycleSpec, layers: str,
                        moa: dict, **moe_overrides) -> ModelConfig:
  """The merged model's config: the sources' `dense` config with the MoE section, and
  for bam the attention experts (`moa`: MoaConfig's fields but num_experts, one per source)."""
  cfg = convert.moe_model_config(dense, spec, layers, **moe_overrides)
  return cfg.replace(moa=MoaConfig(spec.num_experts, **moa)) if spec.method == "bam" else cfg


def check_sources(sources: Sequence, shared_kv: bool = False) -> ModelConfig:
  """The sources' common dense config, or ValueError naming the source and key that
  differ (`sources` are load.Source)."""
  first = sources[0]
  for i, src in enumerate(sources):
    if src.is_moe:
      raise ValueError(f"{src.path}: merge source {i} is already an MoE model; expected a "
                       "dense checkpoint")
    if src.cfg.moa is not None:
      raise ValueError(f"{src.path}: merge source {i} has attention experts; expected a "
                       "dense checkpoint")
  for i, src in enumerate(sources[1:], 1):
    if shared_kv and src.cfg.n_kv_heads != first.cfg.n_kv_heads:
      raise ValueError(f"{src.path}: merge source {i} has {src.cfg.n_kv_heads} KV heads, "
                       f"source 0 ({first.path}) {first.cfg.n_kv_heads}: moa.shared_kv "
                       "averages k and v, which needs equal KV head counts")
    diff = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "arch"
            and getattr(src.cfg, f.name) != getattr(first.cfg, f.name)]
    if diff:
      k = diff[0]
      raise ValueError(f"{src.path}: merge source {i} has {k}={getattr(src.cfg, k)!r}, "
                       f"source 0 ({first.path}) {getattr(first.cfg, k)!r}; expected sources "
                       "of one architecture and shape")
  _check_tokenizers(sources)
  return first.cfg


def _check_tokenizers(sources: Sequence) -> None:
  """Averaged embeddings mean one vocabulary: the sources that have a tokenizer must
  share it (a model without one, e.g. a bare HF directory, is not checked)."""
  named = [(i, s) for i, s in enumerate(sources) if s.has_tokenizer()]
  if len(named) < 2:
    return
  (i0, s0), vocab = named[0], named[0][1].tokenizer().tok.get_vocab()
  for i, src in named[1:]:
    if src.tokenizer().tok.get_vocab() != vocab:
      raise ValueError(f"{src.path}: merge source {i}'s tokenizer differs from source {i0}'s "
                       f"({s0.path}); expected one vocabulary (the embeddings are averaged)")


def _mean_or_base(arrays: Sequence[np.ndarray], base: int) -> np.ndarray:
  return methods.average_params(arrays) if base < 0 else np.asarray(arrays[base])


def merged_layer(i: int, layers: Sequence[dict[tuple, np.ndarray]], cfg: ModelConfig,
                 upcycler: Upcycler, router_std: float = 0.02, base: int = -1
                 ) -> dict[tuple, np.ndarray]:
  """Layer `i` of the merged model from each source's layer `i` ({path below the layer:
  array}); `cfg` is the merged model's config."""
  out: dict[tuple, np.ndarray] = {}
  moe, moa = i in cfg.moe_layer_ids, i in cfg.moa_layer_ids
  if moe:
    denses = [methods.DenseFfn(*(layer[("mlp", n)] for n in _FFN)) for layer in layers]
    out.update(upcycler.layer(i, denses))
  if moa:
    experts = methods.attention_experts([{n: layer[("attn", n)] for n in _ATTN}
                                         for layer in layers], cfg.moa.shared_kv)
    out.update({("attn", n): w.astype(np.float32) for n, w in experts.items()})
    rng = np.random.default_rng([upcycler.seed, i, 1])  # apart from the FFN router's stream
    out[("attn", "router")] = router_init.init_router("normal", cfg.d_model,
                                                      cfg.moa.num_experts, rng, std=router_std)
  for path in layers[0]:
    if (moe and path[0] == "mlp") or (moa and path[0] == "attn"):
      continue
    out[path] = _mean_or_base([layer[path] for layer in layers], base).astype(np.float32)
  return out


def merged_items(sources: Sequence, cfg: ModelConfig, upcycler: Upcycler,
                 router_std: float = 0.02, base: int = -1) -> Iterator[tuple[str, dict]]:
  """Checkpoint items of the merged model: 'root' (averaged, or `base`'s), then each
  layer as soon as it is merged."""
  roots = [src.root() for src in sources]
  yield "root", traverse_util.unflatten_dict(
      {p: _mean_or_base([r[p] for r in roots], base) for p in roots[0]})
  del roots
  for i in range(cfg.n_layers):
    layers = [src.layer(i) for src in sources]
    yield f"layer_{i:03d}", traverse_util.unflatten_dict(
        merged_layer(i, layers, cfg, upcycler, router_std, base))
    del layers
