"""MoeConfig: what an MoE block needs, validated when built (one line naming the key)."""
from __future__ import annotations

import dataclasses

from moe_jax.moe import dispatch, routers

DROP_POLICIES = ("probability", "position")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  num_experts: int
  top_k: int
  expert_dim: int                      # per-expert SwiGLU width
  router: str = "topk_softmax"         # see routers.ROUTERS
  backend: str = "dropless"            # see dispatch.BACKENDS; "auto": pallas on GPU/TPU
  capacity_factor: float = 1.0         # capacity backend and expert_choice
  drop_policy: str = "probability"     # capacity backend: which assignments survive
  norm_topk_prob: bool = False         # softmax_topk: renormalise the kept probabilities
  topk_scaling_factor: float = 1.0     # softmax_topk / sigmoid_bias: scale the weights
  shared_expert_dim: int = 0           # 0 = no shared expert
  shared_expert_gate: bool = False     # Qwen2-MoE: sigmoid(x . w) gate on the shared expert
  aux_loss_coeff: float = 1e-2
  z_loss_coeff: float = 1e-3
  jitter: float = 0.0                  # multiplicative router-input noise in training
  bias_update_rate: float = 1e-3       # sigmoid_bias: b_i += rate * sign(mean - load_i)
  layers: str = "all"                  # "all", "every:N" or "0,3,5"

  def __post_init__(self):
    def bad(key, why):
      raise ValueError(f"moe.{key}={getattr(self, key)!r}: {why}")
    for key in ("num_experts", "top_k", "expert_dim"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
        bad(key, "expected a positive integer")
    if self.top_k > self.num_experts:
      bad("top_k", f"must be <= moe.num_experts={self.num_experts}")
    if self.router not in routers.ROUTERS:
      bad("router", f"unknown; expected one of {sorted(routers.ROUTERS)}")
    if self.backend not in dispatch.BACKENDS:
      bad("backend", f"unknown; expected one of {sorted(dispatch.BACKENDS)}")
    if not self.capacity_factor > 0:
      bad("capacity_factor", "must be > 0")
    if self.drop_policy not in DROP_POLICIES:
      bad("drop_policy", f"expected one of {DROP_POLICIES}")
    if not isinstance(self.shared_expert_dim, int) or self.shared_expert_dim < 0:
      bad("shared_expert_dim", "shared expert width must be a positive integer (0 = none)")
    if self.shared_expert_gate and not self.shared_expert_dim:
      bad("shared_expert_gate", "needs moe.shared_expert_dim > 0")
    for key in ("aux_loss_coeff", "z_loss_coeff", "jitter", "bias_update_rate"):
      if getattr(self, key) < 0:
        bad(key, "must be >= 0")
    parse_layers(self.layers, "moe.layers")

  def moe_layer_ids(self, n_layers: int) -> tuple[int, ...]:
    """Which of `n_layers` layers are MoE."""
    return layer_ids(self.layers, n_layers, "moe.layers")


def parse_layers(spec: str, key: str) -> tuple[str, int | tuple[int, ...]]:
  """('all', 0), ('every', N) or ('list', ids) from a placement string like 'all',
  'every:2' or '0,3,5'; a bad one raises ValueError naming `key`."""
  text = spec.strip()
  if text == "all":
    return "all", 0
  if text.startswith("every:"):
    n = text[len("every:"):]
    if not n.isdigit() or int(n) < 1:
      raise ValueError(f"{key}={spec!r}: expected every:N with N >= 1")
    return "every", int(n)
  try:
    ids = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
  except ValueError:
    ids = ()
  if not ids or ids[0] < 0:
    raise ValueError(f"{key}={spec!r}: expected 'all', 'every:N' or a list of layer ids "
                     "like '0,3,5'")
  return "list", ids


def layer_ids(spec: str, n_layers: int, key: str) -> tuple[int, ...]:
  """Which of `n_layers` layers a placement string selects."""
  kind, arg = parse_layers(spec, key)
  if kind == "all":
    return tuple(range(n_layers))
  if kind == "every":
    return tuple(i for i in range(n_layers) if i % arg == arg - 1)
  if arg[-1] >= n_layers:
    raise ValueError(f"{key}={spec!r}: layer ids must lie in [0, {n_layers})")
  return arg
