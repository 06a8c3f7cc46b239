"""The `pallas` dispatch backend: dropless MoE on the Pallas kernels in pallas_kernels/.

The layer routes with the fused router kernel (`route`) when the router is one it
covers. Assignments are sorted by expert (`permute.plan`), gathered into expert order
(`permute`), run through the expert SwiGLUs as three grouped matmuls (`gmm`), and combined
back with the routing weights (`unpermute`). Each op owns its custom VJP. The kernel
lowering follows the platform (Triton on GPU, Mosaic/megablox on TPU, the interpreter on
CPU); the result equals the `dropless` backend.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.models import layers
from moe_jax.moe import routers
from pallas_kernels.gmm import ops as gmm_ops
from pallas_kernels.permute import ops as permute_ops
from pallas_kernels.router import kernel as router_kernel
from pallas_kernels.router import ops as router_ops

FUSED_ROUTERS = router_kernel.ROUTERS


def route(logits_TxE, cfg, bias_E=None, target=None) -> routers.Routing:
  """routers.route on the fused router kernel, for the routers it covers (FUSED_ROUTERS)."""
  r = router_ops.route(logits_TxE, cfg, bias_E, target=target)
  return routers.Routing(r.weights_TxK, r.experts_TxK, r.probs_TxE)


def _swiglu_gmm(xs_MxD, w_gate, w_up, w_down, sizes_E, target):
  """Rows grouped by expert (sizes_E rows each, in order) through their experts' SwiGLU."""
  return layers.swiglu(xs_MxD, w_gate, w_up, w_down,
                       lambda a, w: gmm_ops.gmm(a, w, sizes_E, target))


def pallas(x_TxD, routing, w_gate, w_up, w_down, cfg, target=None):
  """Backend signature of dispatch.BACKENDS; nothing is dropped."""
  p = permute_ops.plan(routing.experts_TxK, cfg.num_experts)
  xs_MxD = permute_ops.permute(x_TxD, p, target)
  y_MxD = _swiglu_gmm(xs_MxD, w_gate, w_up, w_down, p.group_sizes_E, target)
  return permute_ops.unpermute(y_MxD, routing.weights_TxK, p, target), jnp.float32(0.0)


def grouped_rows(x_MxD, expert_M, w_gate, w_up, w_down, target=None):
  """dispatch.grouped_rows on the kernels: rows sorted by expert with the padding
  (expert_M == E) last, three grouped matmuls over the real groups, and the rows past
  them (which the kernels leave unspecified) zeroed before they are moved back."""
  e = w_gate.shape[0]
  p = permute_ops.plan(expert_M[:, None], e + 1)
  xs_MxD = permute_ops.permute(x_MxD, p, target)
  sizes = p.group_sizes_E[:e]
  y_MxD = _swiglu_gmm(xs_MxD, w_gate, w_up, w_down, sizes, target)
  real = jnp.arange(x_MxD.shape[0]) < jnp.sum(sizes)
  y_MxD = jnp.where(real[:, None], y_MxD, jnp.zeros_like(y_MxD))
  return permute_ops.unpermute(y_MxD, jnp.ones((x_MxD.shape[0], 1), y_MxD.dtype), p, target)
