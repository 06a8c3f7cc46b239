"""Read Hugging Face checkpoint directories: config.json and (sharded) safetensors."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from moe_jax import errors
from moe_jax.config import ModelConfig, RopeScaling
from moe_jax.moe.config import MoeConfig

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Per architecture ("*": all of them), {canonical key: other names of it}, as transformers'
# configuration classes' `attribute_map`s have them: Mixtral and Qwen3-MoE (as transformers 5.23
# writes it) store `num_local_experts`; hub Qwen3-MoE configs and Qwen2-MoE have `num_experts`.
KEY_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "*": {},
    "mixtral": {"num_experts": ("num_local_experts",)},
    "qwen3_moe": {"num_experts": ("num_local_experts",)},
}


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _float(value: Any, key: str, default: float) -> float:
  """`value` (config key `key`) as a float, `default` when absent."""
  if value is None:
    return default
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{key}={value!r}: expected a number") from None


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """rope_theta and scaling from either transformers 4 or 5 style configs."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  if not isinstance(scaling, dict) or not isinstance(params, dict):
    raise ValueError(f"rope_scaling={scaling!r}: expected an object such as "
                     "{\"rope_type\": \"llama3\", \"factor\": 8.0, ...} or null")
  theta = _float(hf.get("rope_theta") or params.get("rope_theta"), "rope_theta", 10000.0)
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return theta, None
  keep = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                  "original_max_position_embeddings") if k in scaling}
  return theta, RopeScaling(rope_type=rope_type, **keep)


def canonical_keys(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
  """`hf` with each KEY_ALIASES alias of its model_type renamed to the canonical key; a
  one-line error if the names of one key disagree."""
  out = dict(hf)
  aliases = {**KEY_ALIASES["*"], **KEY_ALIASES.get(hf.get("model_type"), {})}
  for key, names in aliases.items():
    found = [(n, out.pop(n)) for n in (key, *names) if n in out]
    if any(v != found[0][1] for _, v in found):
      given = " and ".join(f"{n}={v!r}" for n, v in found)
      raise ValueError(f"{source}: {given} are one key ({key!r}) with two values")
    if found:
      out[key] = found[0][1]
  return out


def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig for a transformers config dict of a supported architecture; a one-line
  error naming `source` for anything else."""
  if not isinstance(hf, dict):
    raise ValueError(f"{source}: expected a JSON object of config keys, got "
                     f"{type(hf).__name__}")
  arch = hf.get("model_type")
  if arch not in ARCHS:
    raise ValueError(f"{source}: model_type={arch!r} is not supported; expected one of {ARCHS}")
  hf = canonical_keys(hf, source)
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{source}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
  if hf.get("mlp_bias"):
    raise ValueError(f"{source}: mlp_bias=true is not supported")
  try:
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    window = hf.get("sliding_window")
    if arch.startswith("qwen") and not hf.get("use_sliding_window", False):
      window = None
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_dim=hf["intermediate_size"], rope_theta=theta, rope_scaling=scaling,
        rms_eps=_float(hf.get("rms_norm_eps"), "rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch in ("qwen2", "qwen2_moe") or bool(hf.get("attention_bias", False)),
        qk_norm=arch in ("qwen3", "qwen3_moe"), sliding_window=window,
        max_seq_len=hf.get("max_position_embeddings", 2048), arch=arch,
        moe=_moe_config(hf, arch, source), **overrides)
  except KeyError as e:
    raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
  except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type or form
    msg = errors.one_line(e)
    raise ValueError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def _moe_config(hf: dict[str, Any], arch: str, source: str):
  """MoeConfig of an HF MoE family (dropless routing, as their forward passes are), from a
  config with canonical keys (canonical_keys)."""
  if arch not in ("mixtral", "qwen2_moe", "qwen3_moe"):
    return None
  if arch == "mixtral":
    return MoeConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                     expert_dim=hf["intermediate_size"], router="topk_softmax")
  n = hf["num_hidden_layers"]
  step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
  ids = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
  if not ids:
    raise ValueError(f"{source}: no MoE layers (decoder_sparse_step/mlp_only_layers)")
  shared = hf.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0
  return MoeConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                   expert_dim=hf["moe_intermediate_size"], router="softmax_topk",
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   shared_expert_dim=shared, shared_expert_gate=bool(shared),
                   layers="all" if len(ids) == n else ",".join(map(str, ids)))


def read_hf_config(path: str, **overrides) -> ModelConfig:
  """ModelConfig of the HF checkpoint directory `path` (its config.json)."""
  cfg_path = os.path.join(path, "config.json")
  return config_from_hf(read_json(cfg_path), cfg_path, **overrides)


def safetensors_files(path: str) -> list[str]:
  """The weight files of an HF directory, from the shard index if there is one."""
  index = os.path.join(path, _INDEX)
  if os.path.exists(index):
    files = sorted(set(read_json(index)["weight_map"].values()))
    return [os.path.join(path, f) for f in files]
  single = os.path.join(path, _SINGLE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{path}: no {_SINGLE} or {_INDEX}")
  return [single]


def iter_safetensors(path: str, prefix: str | tuple[str, ...] = ""
                     ) -> Iterator[tuple[str, np.ndarray, str]]:
  """Yields (tensor name, float32 array, file) one tensor at a time; with `prefix`, only
  the tensors whose names start with it (or with one of a tuple of them; the others are
  not read)."""
  for file in safetensors_files(path):
    if not os.path.exists(file):
      raise FileNotFoundError(f"{file}: shard listed in {_INDEX} not found")
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          if not name.startswith(prefix):
            continue
          try:
            w = np.asarray(f.get_tensor(name), dtype=np.float32)
          except (TypeError, ValueError, AttributeError) as e:  # a dtype numpy lacks (FP8)
            raise ValueError(f"{file}: tensor {name} cannot be read ({errors.one_line(e)}); "
                             "expected a float32, float16 or bfloat16 tensor") from None
          yield name, w, file
    except (OSError, SafetensorError) as e:
      raise ValueError(f"{file}: cannot read safetensors ({errors.one_line(e)})") from None


