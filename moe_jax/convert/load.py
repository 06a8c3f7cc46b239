"""One entry point for every checkpoint a user can name: HF dir, GGUF file, moe_jax dir."""
from __future__ import annotations

import os

import jax

from moe_jax import checkpoint
from moe_jax import tokenizer as tokenizer_lib
from moe_jax.config import ModelConfig
from moe_jax.convert import assemble, gguf, hf
from moe_jax.models import llama


def checkpoint_kind(path: str) -> str:
  """'gguf', 'hf' or 'moe_jax'; a one-line error naming the path otherwise."""
  if not path:
    path = gguf.embedded_gguf_path()
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: checkpoint not found")
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return "gguf"
    raise ValueError(f"{path}: expected a .gguf file or a checkpoint directory")
  if checkpoint.is_checkpoint(path):
    return "moe_jax"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise ValueError(f"{path}: expected a Hugging Face directory (config.json + safetensors) "
                   f"or a moe_jax checkpoint ({checkpoint.MARKER})")


def read_config(path: str, **overrides) -> ModelConfig:
  path = path or gguf.embedded_gguf_path()
  kind = checkpoint_kind(path)
  if kind == "gguf":
    return hf.config_from_hf(gguf.read_gguf_config(path), path, **overrides)
  if kind == "hf":
    return hf.read_hf_config(path, **overrides)
  return ModelConfig.from_dict(checkpoint.read_meta(path)["model"]).replace(**overrides)


def load_model(path: str = "", mesh: jax.sharding.Mesh | None = None, **overrides
               ) -> tuple[llama.Transformer, tokenizer_lib.Tokenizer]:
  """Model and tokenizer (None if the checkpoint has none) from `path` ('' = the embedded
  SmolLM2-135M-Instruct GGUF).

  `overrides` replace ModelConfig fields (e.g. dtype="bfloat16").
  """
  path = path or gguf.embedded_gguf_path()
  cfg = read_config(path, **overrides)
  kind = checkpoint_kind(path)
  if kind == "moe_jax":
    model = checkpoint.load(path, mesh, **overrides)
  elif kind == "gguf":
    model = assemble.model_from_tensors(
        cfg, ((n, w, path) for n, w in gguf.iter_gguf_tensors(path)), mesh)
  else:
    model = assemble.model_from_tensors(cfg, hf.iter_safetensors(path), mesh)
  has_tokenizer = kind == "gguf" or os.path.isfile(os.path.join(path, "tokenizer.json"))
  return model, (load_tokenizer(path) if has_tokenizer else None)


def load_tokenizer(path: str = "") -> tokenizer_lib.Tokenizer:
  path = path or gguf.embedded_gguf_path()
  checkpoint_kind(path)  # a one-line error for a bad path
  return tokenizer_lib.load_tokenizer(path)
