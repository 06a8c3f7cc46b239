"""Pure functions for the decoder math: RMSNorm, rotary embeddings, masked GQA attention."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.config import RopeScaling


def rms_norm(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, scaled after casting back (as transformers does)."""
  x32 = x_BxLxD.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale_D.astype(x_BxLxD.dtype) * x32.astype(x_BxLxD.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
  """Inverse rotary frequencies (head_dim/2,), with linear or llama3 scaling."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None or scaling.rope_type == "default":
    return inv
  if scaling.rope_type == "linear":
    return inv / scaling.factor
  # llama3: long wavelengths slowed by `factor`, short kept, a smooth blend between.
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, blended, scaled)


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, inv_freq_K2: jax.Array) -> jax.Array:
  """Rotary embedding in the rotate-half convention of Hugging Face checkpoints."""
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_K2
  angles_BxLxK = jnp.concatenate([angles_BxLxK2, angles_BxLxK2], axis=-1)
  cos = jnp.cos(angles_BxLxK)[:, :, None, :].astype(x_BxLxHxK.dtype)
  sin = jnp.sin(angles_BxLxK)[:, :, None, :].astype(x_BxLxHxK.dtype)
  x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxLxHxK * cos + rotated * sin


def attention_mask(segment_ids_BxL: jax.Array, sliding_window: int | None) -> jax.Array:
  """Boolean [B, 1, L, L]: causal, same segment, and within the sliding window if any."""
  length = segment_ids_BxL.shape[1]
  q_idx = jnp.arange(length)[:, None]
  k_idx = jnp.arange(length)[None, :]
  mask_LxL = k_idx <= q_idx
  if sliding_window is not None:
    mask_LxL &= (q_idx - k_idx) < sliding_window
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (mask_LxL[None] & same_BxLxL)[:, None]


def gqa_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                  mask_Bx1xLxL: jax.Array) -> jax.Array:
  """Grouped-query attention; softmax in float32. Returns [B, L, H, K]."""
  b, length, h, kd = q_BxLxHxK.shape
  g = k_BxLxGxK.shape[2]
  q_BxLxGxRxK = q_BxLxHxK.reshape(b, length, g, h // g, kd)
  scores = jnp.einsum("blgrk,bmgk->bgrlm", q_BxLxGxRxK, k_BxLxGxK,
                      preferred_element_type=jnp.float32) / math.sqrt(kd)
  scores = jnp.where(mask_Bx1xLxL[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxLxGxK.dtype)
  out = jnp.einsum("bgrlm,bmgk->blgrk", probs, v_BxLxGxK)
  return out.reshape(b, length, h, kd)


def swiglu(x_BxLxD: jax.Array, w_gate_DxF: jax.Array, w_up_DxF: jax.Array,
           w_down_FxD: jax.Array, matmul=jnp.matmul) -> jax.Array:
  """The SwiGLU FFN, (silu(x Wg) * x Wu) Wd, its three products by `matmul`: the dense FFN
  by default, experts' stacked [E, C, D] rows the same way (a batched product), and rows
  grouped by expert with a grouped product (`jax.lax.ragged_dot`, the Pallas gmm)."""
  h = jax.nn.silu(matmul(x_BxLxD, w_gate_DxF)) * matmul(x_BxLxD, w_up_DxF)
  return matmul(h, w_down_FxD)


# ------------------------------------------------------------------------- KV cache

def write_cache(cache_BxSx: jax.Array, new_BxLx: jax.Array, index: jax.Array) -> jax.Array:
  """`new` written into slots index .. index+L-1 of a [B, S, ...] cache."""
  return jax.lax.dynamic_update_slice_in_dim(cache_BxSx, new_BxLx.astype(cache_BxSx.dtype),
                                             index, axis=1)


def with_cache(k: jax.Array, v: jax.Array, kv):
  """(keys, values, new_kv) to attend over: without a cache (`kv` None) this call's own
  and None; with `kv` = (k_cache, v_cache, index), the caches with this call's written
  from slot `index`, which are also the new cache."""
  if kv is None:
    return k, v, None
  k_cache, v_cache, index = kv
  k, v = write_cache(k_cache, k, index), write_cache(v_cache, v, index)
  return k, v, (k, v)


def cache_mask(valid_BxS: jax.Array, index: jax.Array, length: int,
               sliding_window: int | None) -> jax.Array:
  """Boolean [B, 1, L, S] for L queries in slots index .. index+L-1 over a cache's S slots:
  causal in slots, only slots holding a real token (`valid_BxS`, false for padding), and
  within the sliding window if any. Real tokens occupy consecutive slots (left padding),
  so slot distances are position distances."""
  q_slot = index + jnp.arange(length)[:, None]
  k_slot = jnp.arange(valid_BxS.shape[1])[None, :]
  mask_LxS = k_slot <= q_slot
  if sliding_window is not None:
    mask_LxS &= (q_slot - k_slot) < sliding_window
  return (mask_LxS[None] & valid_BxS[:, None, :])[:, None]
