"""Text generation with a KV cache: batched prompts, greedy or sampled, stopping on EOS or
on stop strings.

The prompts are left-padded to one width, so every row's last prompt token sits in the
same cache slot and each decoding step writes one slot for all rows; padding slots are
masked out and positions count real tokens only, so a row's tokens do not depend on the
other rows. One jitted prefill fills the cache with the prompts; then `chunk` tokens per
jitted call under `jax.lax.while_loop`, which also stops once every row has ended. The
host checks stop strings between chunks.

For an MoE model the dispatch is the model's: capacity dispatch drops tokens by what
else is in the batch, so generate with a dropless model (evaluate's `moe.backend`
override) when rows must not affect each other.

`generate_uncached` is the reference: a full forward pass over the whole sequence for
every new token, greedy.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0   # 0 = greedy (argmax)
  top_k: int = 0             # 0 = no top-k cut
  top_p: float = 1.0         # 1 = no nucleus cut

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature={self.temperature!r}: expected >= 0 (0 = greedy)")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p!r}: expected 0 < top_p <= 1 (1 = off)")


def sample(logits_BxV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """One token per row [B] int32: argmax at temperature 0, else a draw from the softmax of
  logits / temperature restricted to the top_k largest and to the smallest set whose
  probability reaches top_p (the most likely token is always kept)."""
  logits = logits_BxV.astype(jnp.float32)
  if s.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / s.temperature
  neg = jnp.finfo(jnp.float32).min
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if s.top_p < 1.0:
    desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs   # mass of the tokens ranked above
    kept = jnp.where(before < s.top_p, desc, jnp.inf)
    logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class _State(NamedTuple):
  cache: object          # llama.KVCache
  token_B: jax.Array     # the next token of each row, not yet emitted
  position_B: jax.Array  # its position
  done_B: jax.Array      # the row has emitted EOS
  step: jax.Array        # tokens emitted so far (int32 scalar)


@functools.partial(nnx.jit, static_argnames=("slots", "sampling"))
def _prefill(model, tokens_BxP, real_BxP, key, *, slots: int, sampling: Sampling) -> _State:
  b = tokens_BxP.shape[0]
  positions = jnp.maximum(jnp.cumsum(real_BxP, axis=1) - 1, 0).astype(jnp.int32)
  logits, cache = model.decode(tokens_BxP, positions, model.init_cache(b, slots), real_BxP)
  first = sample(logits[:, -1], jax.random.fold_in(key, 0), sampling)
  return _State(cache, first, positions[:, -1] + 1, jnp.zeros((b,), bool), jnp.int32(0))


@functools.partial(nnx.jit, static_argnames=("steps", "sampling"))
def _decode(model, state: _State, key, eos_id, *, steps: int, sampling: Sampling):
  """Emits up to `steps` tokens per row ([B, steps], -1 after a row's EOS and past the
  end), decoding one cache slot per token; stops early once every row is done."""
  out = jnp.full((state.token_B.shape[0], steps), -1, jnp.int32)
  start = state.step

  def cond(carry):
    s, _ = carry
    return (s.step - start < steps) & ~jnp.all(s.done_B)

  def body(carry):
    s, out = carry
    done = s.done_B | (s.token_B == eos_id)
    out = out.at[:, s.step - start].set(jnp.where(done, -1, s.token_B))
    logits, cache = model.decode(s.token_B[:, None], s.position_B[:, None], s.cache)
    token = sample(logits[:, 0], jax.random.fold_in(key, s.step + 1), sampling)
    return _State(cache, token, s.position_B + 1, done, s.step + 1), out

  return jax.lax.while_loop(cond, body, (state, out))


def _left_pad(prompts: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.zeros((len(prompts), width), np.int32)
  real = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    real[i, width - len(p):] = True
  return tokens, real


def bucket(n: int, multiple: int = 16) -> int:
  """`n` rounded up to a multiple: widths of nearby lengths share one compile."""
  return -(-n // multiple) * multiple


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             eos_id: int | None = None, sampling: Sampling = Sampling(),
             key: jax.Array | None = None, stop_fn=None, chunk: int = 0) -> list[list[int]]:
  """New token ids for each prompt (a list of token-id lists), EOS excluded: at most
  `max_new_tokens` per prompt, fewer where EOS came. `key` seeds sampling (required
  unless greedy). `stop_fn(row, ids)` -> True ends that row early; it is checked every
  `chunk` tokens (0: one chunk of max_new_tokens when there is no stop_fn, else 16) and the
  row is cut where the caller's own check says (see generate_text)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts: expected at least one prompt, each with at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
  if sampling.temperature > 0 and key is None:
    raise ValueError("key: sampling at temperature > 0 needs an explicit jax.random key")
  key = jax.random.key(0) if key is None else key
  chunk = chunk or (16 if stop_fn else max_new_tokens)
  width = bucket(max(len(p) for p in prompts))
  tokens, real = _left_pad(prompts, width)
  eos = jnp.int32(-1 if eos_id is None else eos_id)
  state = _prefill(model, jnp.asarray(tokens), jnp.asarray(real), key,
                   slots=width + bucket(max_new_tokens, chunk), sampling=sampling)
  rows = [[] for _ in prompts]
  stopped = np.zeros(len(prompts), bool)
  while True:
    steps = min(chunk, max_new_tokens - int(state.step))
    state, out = _decode(model, state, key, eos, steps=steps, sampling=sampling)
    for i, row in enumerate(np.asarray(out)):
      if not stopped[i]:
        rows[i].extend(int(t) for t in row if t >= 0)
        stopped[i] = bool(stop_fn and stop_fn(i, rows[i]))
    done = np.asarray(state.done_B) | stopped
    if int(state.step) >= max_new_tokens or done.all():
      return rows
    if stopped.any():  # a row ended by stop_fn emits nothing more
      state = state._replace(done_B=jnp.asarray(done))


def generate_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, *,
                  stop: Sequence[str] = (), **kw) -> list[str]:
  """Completions of text prompts, each cut before the first of the `stop` strings (the
  stop string itself excluded) and at EOS; generation of a row ends once it has one."""
  return complete(model, tokenizer, [tokenizer.encode(p) for p in prompts], max_new_tokens,
                  stop=stop, **kw)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """`text` up to the first of the `stop` strings, and whether one was there."""
  hits = [text.index(s) for s in stop if s and s in text]
  return (text[:min(hits)], True) if hits else (text, False)


def complete(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
             *, stop: Sequence[str] = (), **kw) -> list[str]:
  """generate_text for prompts already tokenized (an evaluation harness's own encoding)."""
  stop_fn = (lambda i, row: cut_at_stop(tokenizer.decode(row), stop)[1]) if stop else None
  rows = generate(model, prompt_ids, max_new_tokens, eos_id=tokenizer.eos_id, stop_fn=stop_fn,
                  **kw)
  return [cut_at_stop(tokenizer.decode(r), stop)[0] for r in rows]


@nnx.jit
def _next_token_uncached(model, tokens_1xL: jax.Array, pos: jax.Array) -> jax.Array:
  logits, _ = model(tokens_1xL)
  return jnp.argmax(logits[0, pos]).astype(jnp.int32)


def generate_uncached(model, prompt_ids: Sequence[int], max_new_tokens: int = 32,
                      eos_id: int | None = None) -> list[int]:
  """The reference: greedy, one prompt, a full forward over a fixed-length buffer for
  every new token (one compile, no cache)."""
  length = len(prompt_ids) + max_new_tokens
  buf = np.zeros((1, length), np.int32)
  buf[0, :len(prompt_ids)] = prompt_ids
  out = []
  for pos in range(len(prompt_ids) - 1, length - 1):
    tok = int(_next_token_uncached(model, jnp.asarray(buf), jnp.int32(pos)))
    if tok == eos_id:
      break
    buf[0, pos + 1] = tok
    out.append(tok)
  return out
