"""Hidden states at each layer's FFN input, for data-driven router initialisation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.models import layers as L


@nnx.jit
def mlp_inputs(model, tokens_BxL: jax.Array) -> list[jax.Array]:
  """[B, L, D] inputs of every layer's FFN (after its RMSNorm) for a dense model."""
  cfg = model.cfg
  positions = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
  mask = L.attention_mask(jnp.ones_like(tokens_BxL), cfg.sliding_window)
  inv_freq = L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
  x = jnp.take(model.embed[...], tokens_BxL, axis=0)
  out = []
  for block in model.layers:
    x = x + block.attn(L.rms_norm(x, block.attn_norm[...], cfg.rms_eps), positions, mask, inv_freq)
    h = L.rms_norm(x, block.mlp_norm[...], cfg.rms_eps)
    out.append(h)
    x = x + block.mlp(h)[0]
  return out


def layer_states(model, windows_NxL: np.ndarray) -> list[np.ndarray]:
  """Per layer, all FFN-input vectors of the windows, [N*L, D]."""
  per_layer = [mlp_inputs(model, jnp.asarray(w[None])) for w in windows_NxL]
  return [np.concatenate([np.asarray(s[i][0]) for s in per_layer]) for i in range(len(per_layer[0]))]


def prompt_directions(model, prompt_ids: list[list[int]]) -> list[np.ndarray]:
  """Per layer, [P, D]: each prompt's mean FFN-input state (mergekit's "hidden" init)."""
  states = [mlp_inputs(model, jnp.asarray(ids)[None]) for ids in prompt_ids]
  n_layers = len(states[0])
  return [np.stack([np.asarray(s[i][0]).mean(0) for s in states]) for i in range(n_layers)]
