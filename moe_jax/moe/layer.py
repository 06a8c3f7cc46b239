"""MoeBlock: holds the router, expert and shared-expert params; the math is in
routers.py, dispatch.py and losses.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.models import layers
from moe_jax.moe import dispatch, expert_parallel, losses, routers
from moe_jax.moe.config import MoeConfig

_init = nnx.initializers.normal(0.02)


def _param(rngs, shape, names, dtype, init=_init) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def update_router_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 auxiliary-loss-free balancing: b_i += rate * sign(mean_load - load_i)
  (over the last axis: [..., E] rows of stacked layers each by its own mean)."""
  mean = jnp.mean(load_E, axis=-1, keepdims=True)
  return bias_E + rate * jnp.sign(mean - load_E).astype(bias_E.dtype)


def _route(logits_TxE, cfg: MoeConfig, bias_E):
  """The fused Pallas router when the dispatch resolves to `pallas` (same semantics),
  else routers.route."""
  if dispatch.resolve_backend(cfg.backend) == "pallas":
    from moe_jax.moe import pallas_backend  # pylint: disable=g-import-not-at-top
    if cfg.router in pallas_backend.FUSED_ROUTERS:
      return pallas_backend.route(logits_TxE, cfg, bias_E)
  return routers.route(logits_TxE, cfg, bias_E=bias_E)


def capturing(module: nnx.Module) -> bool:
  """True only while `nnx.capture(..., nnx.Intermediate)` runs `module` (it gives each
  module a `__captures__` tuple for the call). Outside it `Module.sow` would instead add an
  Intermediate attribute, a new variable in nnx.state and so in checkpoints: never sow then."""
  return any(type(v) is nnx.Intermediate for v in getattr(module, "__captures__", ()))


def sow(module: nnx.Module, name: str, value: jax.Array) -> None:
  """Records `value` under `name` (the last call's value) when a capture runs the model
  (`moe_jax.models.llama.capture`); otherwise does nothing and traces nothing."""
  if capturing(module):
    module.sow(nnx.Intermediate, name, value, reduce_fn=lambda _, v: v)


def router_logits(x_TxD, router_DxE, cfg: MoeConfig, jitter_key=None) -> jax.Array:
  """float32 [T, E] router logits; with `jitter_key` (and cfg.jitter > 0) the input is
  scaled by uniform noise in [1 - jitter, 1 + jitter] first."""
  x32 = x_TxD.astype(jnp.float32)
  if jitter_key is not None and cfg.jitter > 0:
    x32 = x32 * jax.random.uniform(jitter_key, x32.shape, jnp.float32,
                                   1.0 - cfg.jitter, 1.0 + cfg.jitter)
  return x32 @ router_DxE.astype(jnp.float32)


def moe_forward(x_TxD, router_DxE, w_gate, w_up, w_down, cfg: MoeConfig, *,
                bias_E=None, jitter_key=None, dtype=jnp.float32):
  """Routed experts only: (y_TxD, stats). Router in float32, experts in `dtype`. With a
  mesh in context whose `expert` axis is > 1 the dispatch is expert-parallel."""
  logits_TxE = router_logits(x_TxD, router_DxE, cfg, jitter_key)
  if expert_parallel.enabled(x_TxD.shape[0]):
    return expert_parallel.moe_forward_ep(x_TxD, logits_TxE, w_gate, w_up, w_down, cfg,
                                          bias_E=bias_E, dtype=dtype)
  routing = _route(logits_TxE, cfg, bias_E)
  y, dropped = dispatch.BACKENDS[cfg.backend](
      x_TxD.astype(dtype), routing, w_gate.astype(dtype), w_up.astype(dtype),
      w_down.astype(dtype), cfg)
  return y, losses.router_stats(routing, logits_TxE, cfg, dropped)


class MoeBlock(nnx.Module):
  """E routed SwiGLU experts, top-k routing, optional (gated) shared expert."""

  def __init__(self, cfg: MoeConfig, d_model: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=jnp.float32):
    self.cfg, self.dtype = cfg, jnp.dtype(dtype)
    e, f, d = cfg.num_experts, cfg.expert_dim, d_model
    self.router = _param(rngs, (d, e), ("embed", None), param_dtype)
    if cfg.router == "sigmoid_bias":
      self.router_bias = nnx.BatchStat(jnp.zeros((e,), jnp.float32))
    self.w_gate = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), param_dtype)
    self.w_up = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), param_dtype)
    self.w_down = _param(rngs, (e, f, d), ("expert", "mlp", "embed"), param_dtype)
    if cfg.shared_expert_dim:
      fs = cfg.shared_expert_dim
      self.shared_w_gate = _param(rngs, (d, fs), ("embed", "mlp"), param_dtype)
      self.shared_w_up = _param(rngs, (d, fs), ("embed", "mlp"), param_dtype)
      self.shared_w_down = _param(rngs, (fs, d), ("mlp", "embed"), param_dtype)
      if cfg.shared_expert_gate:
        self.shared_gate = _param(rngs, (d, 1), ("embed", None), param_dtype)

  def __call__(self, x_BxLxD, *, train: bool = False, key: jax.Array | None = None):
    """(y_BxLxD, stats): stats hold aux_loss and z_loss (with coefficients), load_E,
    probs_E (the mean router probabilities), dropped_fraction and router_entropy, all
    float32. Under a capture it also records its
    routing (`_sow_routing`); otherwise nothing extra is traced."""
    b, length, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * length, d)
    key = key if (train and self.cfg.jitter > 0) else None
    bias = self.router_bias[...] if hasattr(self, "router_bias") else None
    y_TxD, stats = moe_forward(x_TxD, self.router[...], self.w_gate[...], self.w_up[...],
                               self.w_down[...], self.cfg, bias_E=bias, jitter_key=key,
                               dtype=self.dtype)
    if capturing(self):
      self._sow_routing(x_TxD, bias, key, (b, length))
    if self.cfg.shared_expert_dim:
      dt = self.dtype
      xs = x_TxD.astype(dt)
      shared = layers.swiglu(xs, *(w[...].astype(dt) for w in (
          self.shared_w_gate, self.shared_w_up, self.shared_w_down)))
      if self.cfg.shared_expert_gate:
        shared = jax.nn.sigmoid(xs @ self.shared_gate[...].astype(dt)) * shared
      y_TxD = y_TxD + shared
    return y_TxD.reshape(b, length, d).astype(x_BxLxD.dtype), stats

  def _sow_routing(self, x_TxD, bias_E, key, shape_BxL) -> None:
    """Under a capture: this layer's router_logits and router_probs [B, L, E], and the
    chosen experts (int32) and their combine weights [B, L, K], recomputed from the same
    inputs with the same functions as moe_forward (so equal to what it routed with)."""
    logits_TxE = router_logits(x_TxD, self.router[...], self.cfg, key)
    routing = _route(logits_TxE, self.cfg, bias_E)
    for name, value in (("router_logits", logits_TxE), ("router_probs", routing.probs_TxE),
                        ("experts", routing.experts_TxK),
                        ("expert_weights", routing.weights_TxK)):
      sow(self, name, value.reshape(*shape_BxL, value.shape[-1]))
