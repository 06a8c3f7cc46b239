"""Model configuration: one frozen dataclass for every Llama-family decoder.

Modules take this small dataclass, never an ml_collections config (STYLE.md #3).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from moe_jax.moe.attention import MoaConfig
  from moe_jax.moe.config import MoeConfig

DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")
BLOCKS = ("sequential", "parallel")
# Activation rematerialisation in training (layer_stack.REMAT_POLICIES): none, full (each block
# recomputed in the backward pass, only its input kept), save_dots (matmul outputs kept).
REMATS = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling as transformers' `rope_type`s define it."""
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_scaling.rope_type={self.rope_type!r}: expected one of {ROPE_TYPES}")
    for key in ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):
      v = getattr(self, key)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"rope_scaling.{key}={v!r}: expected a positive number")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  max_seq_len: int = 2048
  dtype: str = "float32"         # compute dtype
  param_dtype: str = "float32"
  arch: str = "llama"            # source architecture, kept for export
  moe: MoeConfig | None = None
  # sequential: x + Attn(norm1 x), then + FFN(norm2 .); parallel (GPT-J, PaLM, BAM's
  # seeds): x + Attn(norm x) + FFN(norm x), one norm per block.
  block: str = "sequential"
  moa: MoaConfig | None = None   # attention experts (BAM), in moa.layers
  remat: str = "none"            # training only (REMATS); the same function either way
  # The forward pass as one lax.scan over each repeating unit of layers
  # (models/layer_stack.py): one compiled body, not n_layers copies. Training stores the
  # layers stacked for it; checkpoints and every other tool keep them per layer.
  scan_layers: bool = False

  def __post_init__(self):
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "ffn_dim", "max_seq_len"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
        raise ValueError(f"model.{key}={getattr(self, key)!r}: expected a positive integer")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of "
                       f"model.n_kv_heads={self.n_kv_heads}")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise ValueError(f"model.{key}={getattr(self, key)!r}: expected one of {DTYPES}")
    if self.block not in BLOCKS:
      raise ValueError(f"model.block={self.block!r}: expected one of {BLOCKS}")
    if self.remat not in REMATS:
      raise ValueError(f"model.remat={self.remat!r}: expected one of {REMATS}")
    if self.moa is not None and (self.qkv_bias or self.qk_norm):
      raise ValueError("model.moa: attention experts are built for Llama-style attention; "
                       "expected qkv_bias=False and qk_norm=False")

  @property
  def moa_layer_ids(self) -> tuple[int, ...]:
    return self.moa.moa_layer_ids(self.n_layers) if self.moa else ()

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    return self.moe.moe_layer_ids(self.n_layers) if self.moe else ()

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"model config: unknown keys {sorted(unknown)}")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("moe") is not None:
      from moe_jax.moe.config import MoeConfig  # pylint: disable=g-import-not-at-top
      d["moe"] = MoeConfig(**d["moe"])
    if d.get("moa") is not None:
      from moe_jax.moe.attention import MoaConfig  # pylint: disable=g-import-not-at-top
      d["moa"] = MoaConfig(**d["moa"])
    return cls(**d)
