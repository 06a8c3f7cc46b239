"""Perplexity by one fixed definition (generation: moe_jax/generation.py).

Perplexity: tokenise without special tokens, cut into non-overlapping windows of
`seq_len` tokens (the remainder dropped), mean next-token NLL over all predicted
positions (seq_len - 1 per window).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def make_windows(ids: list[int] | np.ndarray, seq_len: int, max_windows: int = 0,
                 source: str = "eval text") -> np.ndarray:
  """[N, seq_len] int32 windows; a one-line error if the text is shorter than one window."""
  ids = np.asarray(ids, dtype=np.int32)
  n = len(ids) // seq_len
  if n == 0:
    raise ValueError(f"{source}: {len(ids)} tokens, shorter than one window of seq_len={seq_len}")
  if max_windows > 0:
    n = min(n, max_windows)
  return ids[: n * seq_len].reshape(n, seq_len)


@nnx.jit
def _window_nll(model, tokens_BxL: jax.Array) -> jax.Array:
  """Summed next-token NLL per window, [B]."""
  logits, _ = model(tokens_BxL)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return nll.sum(axis=-1)


def mean_nll(model, windows_NxL: np.ndarray, batch_size: int = 4) -> tuple[float, int]:
  """(mean NLL, number of predicted tokens). The last batch is padded, not recompiled."""
  n, length = windows_NxL.shape
  total = 0.0
  for start in range(0, n, batch_size):
    batch = windows_NxL[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    total += float(np.sum(np.asarray(_window_nll(model, jnp.asarray(batch)))[:real], dtype=np.float64))
  tokens = n * (length - 1)
  return total / tokens, tokens


def perplexity(model, windows_NxL: np.ndarray, batch_size: int = 4) -> dict:
  loss, tokens = mean_nll(model, windows_NxL, batch_size)
  return {"eval_loss": loss, "ppl": math.exp(loss), "tokens": tokens}
