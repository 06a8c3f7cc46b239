"""Hugging Face tensor names <-> moe_jax param paths, with the layout change each needs.

HF stores Linear weights as [out, in]; moe_jax stores [in, out] split into heads
where it helps sharding. One table serves import (HF safetensors and GGUF, which is
first renamed to HF names) and export.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from moe_jax.config import ModelConfig

Path = tuple  # a param path in the NNX state, e.g. ("layers", 3, "attn", "wq")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _rules(cfg: ModelConfig) -> list[tuple[str, tuple, Callable, Callable]]:
  """(HF name regex, path template, hf->ours, ours->hf); '{i}' is the layer index."""
  d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  same = (lambda w: w, lambda w: w)
  linear = (lambda w: w.T, lambda w: w.T)

  def heads_in(n):  # [n*k, d] -> [d, n, k]
    return (lambda w: w.T.reshape(d, n, k), lambda w: w.reshape(d, n * k).T)

  def heads_bias(n):
    return (lambda b: b.reshape(n, k), lambda b: b.reshape(n * k))

  attn = r"model\.layers\.(\d+)\.self_attn\."
  mlp = r"model\.layers\.(\d+)\.mlp\."
  return [
      (r"model\.embed_tokens\.weight", ("embed",), *same),
      (r"lm_head\.weight", ("lm_head",), *linear),
      (r"model\.norm\.weight", ("final_norm",), *same),
      (r"model\.layers\.(\d+)\.input_layernorm\.weight", ("attn_norm",), *same),
      (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", ("mlp_norm",), *same),
      (attn + r"q_proj\.weight", ("attn", "wq"), *heads_in(h)),
      (attn + r"k_proj\.weight", ("attn", "wk"), *heads_in(g)),
      (attn + r"v_proj\.weight", ("attn", "wv"), *heads_in(g)),
      (attn + r"o_proj\.weight", ("attn", "wo"),
       lambda w: w.T.reshape(h, k, d), lambda w: w.reshape(h * k, d).T),
      (attn + r"q_proj\.bias", ("attn", "bq"), *heads_bias(h)),
      (attn + r"k_proj\.bias", ("attn", "bk"), *heads_bias(g)),
      (attn + r"v_proj\.bias", ("attn", "bv"), *heads_bias(g)),
      (attn + r"q_norm\.weight", ("attn", "q_norm"), *same),
      (attn + r"k_norm\.weight", ("attn", "k_norm"), *same),
      (mlp + r"gate_proj\.weight", ("mlp", "w_gate"), *linear),
      (mlp + r"up_proj\.weight", ("mlp", "w_up"), *linear),
      (mlp + r"down_proj\.weight", ("mlp", "w_down"), *linear),
  ]


def hf_to_path(cfg: ModelConfig, name: str) -> Path | None:
  """The moe_jax param path of an HF tensor; None for ignored buffers; KeyError if unknown."""
  if _IGNORED.match(name):
    return None
  for pattern, path, _, _ in _rules(cfg):
    m = re.fullmatch(pattern, name)
    if m:
      return (("layers", int(m.group(1))) + path) if m.groups() else path
  raise KeyError(name)


def _find(cfg: ModelConfig, path: Path) -> tuple[str, Callable, Callable]:
  layer = None
  if path[0] == "layers":
    layer, path = path[1], path[2:]
  for pattern, template, to_ours, to_hf in _rules(cfg):
    if template == tuple(path):
      return pattern.replace(r"(\d+)", str(layer)).replace("\\", ""), to_ours, to_hf
  raise KeyError(path)


def path_to_hf_name(cfg: ModelConfig, path: Path) -> str:
  return _find(cfg, path)[0]


def to_ours(cfg: ModelConfig, path: Path, w: np.ndarray) -> np.ndarray:
  return _find(cfg, path)[1](w)


def path_to_hf(cfg: ModelConfig, path: Path, w: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `hf_to_path` + `to_ours`: the HF name and HF-layout array of a param."""
  name, _, to_hf = _find(cfg, path)
  return name, to_hf(w)


def hf_shape(cfg: ModelConfig, path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF-layout shape of a param of moe_jax shape `shape`."""
  return tuple(_find(cfg, path)[2](np.broadcast_to(np.float32(0), shape)).shape)
