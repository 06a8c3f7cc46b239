"""The `pallas` dispatch backend: dropless MoE on the Pallas kernels in pallas_kernels/.

Assignments are sorted by expert (`permute.plan`), gathered into expert order
(`permute`), run through the expert SwiGLUs as three grouped matmuls (`gmm`), and combined
back with the routing weights (`unpermute`). Each op owns its custom VJP. The kernel
lowering follows the platform (Triton on GPU, Mosaic/megablox on TPU, the interpreter on
CPU); the result equals the `dropless` backend.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import ops as gmm_ops
from pallas_kernels.permute import ops as permute_ops


def pallas(x_TxD, routing, w_gate, w_up, w_down, cfg, target=None):
  """Backend signature of dispatch.BACKENDS; nothing is dropped."""
  p = permute_ops.plan(routing.experts_TxK, cfg.num_experts)
  xs_MxD = permute_ops.permute(x_TxD, p, target)
  sizes = p.group_sizes_E
  h_MxF = (jax.nn.silu(gmm_ops.gmm(xs_MxD, w_gate, sizes, target))
           * gmm_ops.gmm(xs_MxD, w_up, sizes, target))
  y_MxD = gmm_ops.gmm(h_MxF, w_down, sizes, target)
  return permute_ops.unpermute(y_MxD, routing.weights_TxK, p, target), jnp.float32(0.0)
