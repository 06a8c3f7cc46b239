"""Hugging Face tensor names <-> moe_jax param paths, with the layout change each needs.

HF stores Linear weights as [out, in]; moe_jax stores [in, out], split into heads where
that helps sharding, and stacks routed experts into one [E, ...] param. One table
serves import (HF safetensors, and GGUF renamed to HF names) and export.
Names use `{L}` for the layer index and `{E}` for the expert index.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from moe_jax.config import ModelConfig

Path = tuple  # a param path in the NNX state, e.g. ("layers", 3, "attn", "wq")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# How each HF MoE family names its layer: (block prefix, gate, up, down) per expert.
MOE_NAMING = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


class Rule(NamedTuple):
  name: str        # HF name template with {L} / {E}
  path: tuple      # moe_jax path below the layer (or from the root)
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def regex(self) -> re.Pattern:
    pattern = re.escape(self.name).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile(pattern)


def moe_naming(cfg: ModelConfig) -> str:
  return "mixtral" if cfg.arch == "mixtral" else "qwen"


def _rules(cfg: ModelConfig) -> list[Rule]:
  d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  same = (lambda w: w, lambda w: w)
  linear = (lambda w: w.T, lambda w: w.T)

  def heads_in(n):  # [n*k, d] <-> [d, n, k]
    return (lambda w: w.T.reshape(d, n, k), lambda w: w.reshape(d, n * k).T)

  def heads_bias(n):
    return (lambda b: b.reshape(n, k), lambda b: b.reshape(n * k))

  attn, layer = "model.layers.{L}.self_attn.", "model.layers.{L}."
  rules = [
      Rule("model.embed_tokens.weight", ("embed",), *same),
      Rule("lm_head.weight", ("lm_head",), *linear),
      Rule("model.norm.weight", ("final_norm",), *same),
      Rule(layer + "input_layernorm.weight", ("attn_norm",), *same),
      Rule(layer + "post_attention_layernorm.weight", ("mlp_norm",), *same),
      Rule(attn + "q_proj.weight", ("attn", "wq"), *heads_in(h)),
      Rule(attn + "k_proj.weight", ("attn", "wk"), *heads_in(g)),
      Rule(attn + "v_proj.weight", ("attn", "wv"), *heads_in(g)),
      Rule(attn + "o_proj.weight", ("attn", "wo"),
           lambda w: w.T.reshape(h, k, d), lambda w: w.reshape(h * k, d).T),
      Rule(attn + "q_proj.bias", ("attn", "bq"), *heads_bias(h)),
      Rule(attn + "k_proj.bias", ("attn", "bk"), *heads_bias(g)),
      Rule(attn + "v_proj.bias", ("attn", "bv"), *heads_bias(g)),
      Rule(attn + "q_norm.weight", ("attn", "q_norm"), *same),
      Rule(attn + "k_norm.weight", ("attn", "k_norm"), *same),
      Rule(layer + "mlp.gate_proj.weight", ("mlp", "w_gate"), *linear),
      Rule(layer + "mlp.up_proj.weight", ("mlp", "w_up"), *linear),
      Rule(layer + "mlp.down_proj.weight", ("mlp", "w_down"), *linear),
  ]
  block, w_gate, w_up, w_down = MOE_NAMING[moe_naming(cfg)]
  moe = f"{layer}{block}."
  rules += [
      Rule(moe + "gate.weight", ("mlp", "router"), *linear),
      Rule(moe + f"experts.{{E}}.{w_gate}.weight", ("mlp", "w_gate"), *linear),
      Rule(moe + f"experts.{{E}}.{w_up}.weight", ("mlp", "w_up"), *linear),
      Rule(moe + f"experts.{{E}}.{w_down}.weight", ("mlp", "w_down"), *linear),
      Rule(moe + "shared_expert.gate_proj.weight", ("mlp", "shared_w_gate"), *linear),
      Rule(moe + "shared_expert.up_proj.weight", ("mlp", "shared_w_up"), *linear),
      Rule(moe + "shared_expert.down_proj.weight", ("mlp", "shared_w_down"), *linear),
      Rule(moe + "shared_expert_gate.weight", ("mlp", "shared_gate"), *linear),
  ]
  return rules


class Match(NamedTuple):
  path: Path               # full moe_jax path
  expert: int | None       # index into the stacked [E, ...] param, or None
  rule: Rule


def match(cfg: ModelConfig, name: str) -> Match | None:
  """Where an HF tensor goes; None for ignored buffers; KeyError if no rule knows it."""
  if _IGNORED.match(name):
    return None
  for rule in _rules(cfg):
    m = rule.regex.fullmatch(name)
    if m:
      groups = m.groupdict()
      path = (("layers", int(groups["L"])) + rule.path) if "L" in groups else rule.path
      return Match(path, int(groups["E"]) if "E" in groups else None, rule)
  raise KeyError(name)


def match_stream(cfg: ModelConfig, name: str, source: str) -> Match | None:
  """`match` for a checkpoint being read: None also for a tied model's stored head; an
  unknown name is a one-line ValueError naming the file."""
  if cfg.tie_embeddings and name == "lm_head.weight":
    return None  # some tied checkpoints store the head anyway
  try:
    return match(cfg, name)
  except KeyError:
    raise ValueError(f"{source}: unexpected tensor {name!r} for a {cfg.arch} model") from None


def _rule_for(cfg: ModelConfig, path: Path, expert: bool) -> tuple[Rule, int | None]:
  layer, sub = (path[1], path[2:]) if path[0] == "layers" else (None, path)
  for rule in _rules(cfg):
    if rule.path == tuple(sub) and ("{E}" in rule.name) == expert:
      return rule, layer
  raise KeyError(path)


def hf_name(cfg: ModelConfig, path: Path, expert: int | None = None) -> str:
  rule, layer = _rule_for(cfg, path, expert is not None)
  return rule.name.replace("{L}", str(layer)).replace("{E}", str(expert))


def to_hf(cfg: ModelConfig, path: Path, w: np.ndarray, expert: int | None = None
          ) -> tuple[str, np.ndarray]:
  """HF name and HF-layout array of one param (one expert's slice if `expert` is given)."""
  rule, _ = _rule_for(cfg, path, expert is not None)
  return hf_name(cfg, path, expert), rule.to_hf(w if expert is None else w[expert])


def is_stacked_expert(cfg: ModelConfig, path: Path) -> bool:
  """Whether `path` is an MoE layer's [E, ...] stack of routed-expert weights."""
  return (path[0] == "layers" and path[1] in cfg.moe_layer_ids and path[-2] == "mlp"
          and path[-1] in ("w_gate", "w_up", "w_down"))


def param_tensors(cfg: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, HF-layout array) for (path, array) pairs of a model's params, each routed
  expert of a stacked [E, ...] param as its own tensor."""
  for path, w in params:
    for e in range(w.shape[0]) if is_stacked_expert(cfg, path) else (None,):
      yield to_hf(cfg, path, w, e)


def hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF-layout shape of a param (or expert slice) of moe_jax shape `shape`."""
  return tuple(rule.to_hf(np.broadcast_to(np.float32(0), shape)).shape)
