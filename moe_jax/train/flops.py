"""FLOP count of the active parameters, for tokens/s -> model FLOPs utilisation."""
from __future__ import annotations

import jax

from moe_jax.config import ModelConfig

# Dense bf16 peak per device, for MFU; None where unknown (CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}


def active_params_per_token(cfg: ModelConfig) -> int:
  """Matmul params a token passes through (routed experts: only its top-k)."""
  d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  attn = d * (h + 2 * g) * k + h * k * d
  total = cfg.vocab_size * d  # the LM head
  for i in range(cfg.n_layers):
    if i in cfg.moa_layer_ids:  # every attention expert runs (soft, and top-k as computed)
      n = cfg.moa.num_experts
      total += d * n + n * 2 * d * h * k + (1 if cfg.moa.shared_kv else n) * 2 * d * g * k
    else:
      total += attn
    if i in cfg.moe_layer_ids:
      m = cfg.moe
      total += d * m.num_experts + m.top_k * 3 * d * m.expert_dim + 3 * d * m.shared_expert_dim
    else:
      total += 3 * d * cfg.ffn_dim
  return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """6 N (forward + backward matmuls) plus causal attention scores and values."""
  experts = [cfg.moa.num_experts if i in cfg.moa_layer_ids else 1 for i in range(cfg.n_layers)]
  # 12*H*K*T / 2 (causal) per layer and attention expert
  attention = 6 * sum(experts) * cfg.n_heads * cfg.head_dim * seq_len
  return 6.0 * active_params_per_token(cfg) + attention


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None
