"""Llama-family decoder in Flax NNX. Modules hold params; math lives in layers.py.

Every parameter carries logical axis names (`out_sharding` metadata); the mapping to
mesh axes lives only in moe_jax/sharding.py. `capture` runs the model once and also returns
what the blocks record (FFN inputs, routing): see moe_jax/moe/layer.py `sow`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.models import layer_stack, layers
from moe_jax.moe import attention as moa_lib
from moe_jax.moe import layer as moe_layer

_init = nnx.initializers.normal(0.02)


def _param(rngs: nnx.Rngs, shape, names, dtype, init=_init) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def _ones(shape, names, dtype) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), out_sharding=names)


class Attention(nnx.Module):
  """GQA with optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.wq = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), pd)
    self.wk = _param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = _param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), pd)
    self.wo = _param(rngs, (h, k, d), ("heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.bq = _param(rngs, (h, k), ("heads", "head_dim"), pd, zeros)
      self.bk = _param(rngs, (g, k), ("kv_heads", "head_dim"), pd, zeros)
      self.bv = _param(rngs, (g, k), ("kv_heads", "head_dim"), pd, zeros)
    if cfg.qk_norm:
      self.q_norm = _ones((k,), ("head_dim",), pd)
      self.k_norm = _ones((k,), ("head_dim",), pd)

  def __call__(self, x_BxLxD, positions_BxL, mask, inv_freq, kv=None):
    """(y_BxLxD, {}, new_kv). With `kv` = (k_cache, v_cache, index), this call's keys and
    values go into the caches' slots from `index` and the queries attend over the caches
    (`mask` [B, 1, L, S]); new_kv is the updated (k_cache, v_cache), else None."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    q = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wq[...].astype(dt))
    k = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wk[...].astype(dt))
    v = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wv[...].astype(dt))
    if cfg.qkv_bias:
      q, k, v = (q + self.bq[...].astype(dt), k + self.bk[...].astype(dt),
                 v + self.bv[...].astype(dt))
    if cfg.qk_norm:
      q = layers.rms_norm(q, self.q_norm[...], cfg.rms_eps)
      k = layers.rms_norm(k, self.k_norm[...], cfg.rms_eps)
    q = layers.apply_rope(q, positions_BxL, inv_freq)
    k = layers.apply_rope(k, positions_BxL, inv_freq)
    k, v, new_kv = layers.with_cache(k, v, kv)
    out_BxLxHxK = layers.gqa_attention(q, k.astype(dt), v.astype(dt), mask)
    return jnp.einsum("blhk,hkd->bld", out_BxLxHxK, self.wo[...].astype(dt)), {}, new_kv

  def cache_shape(self, batch: int, slots: int) -> tuple[int, ...]:
    return (batch, slots, self.cfg.n_kv_heads, self.cfg.head_dim)


class Mlp(nnx.Module):
  """Dense SwiGLU FFN."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.dtype = jnp.dtype(cfg.dtype)
    self.w_gate = _param(rngs, (cfg.d_model, cfg.ffn_dim), ("embed", "mlp"), pd)
    self.w_up = _param(rngs, (cfg.d_model, cfg.ffn_dim), ("embed", "mlp"), pd)
    self.w_down = _param(rngs, (cfg.ffn_dim, cfg.d_model), ("mlp", "embed"), pd)

  def __call__(self, x_BxLxD, *, train: bool = False, key=None):
    del train, key
    dt = self.dtype
    return layers.swiglu(x_BxLxD, self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
                         self.w_down[...].astype(dt)), {}


class MoaAttention(nnx.Module):
  """N attention experts and a soft (or top-k) router: moe_jax/moe/attention.py. With
  shared KV, wk and wv have no expert axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    n, d, h, g, k = cfg.moa.num_experts, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kv, kv_names = ((d, g, k), ("embed", "kv_heads", "head_dim")) if cfg.moa.shared_kv else (
        (n, d, g, k), ("expert", "embed", "kv_heads", "head_dim"))
    self.router = _param(rngs, (d, n), ("embed", None), pd)
    self.wq = _param(rngs, (n, d, h, k), ("expert", "embed", "heads", "head_dim"), pd)
    self.wk = _param(rngs, kv, kv_names, pd)
    self.wv = _param(rngs, kv, kv_names, pd)
    self.wo = _param(rngs, (n, h, k, d), ("expert", "heads", "head_dim", "embed"), pd)

  def __call__(self, x_BxLxD, positions_BxL, mask, inv_freq, kv=None):
    """(y_BxLxD, stats, new_kv): stats hold load_E and router_entropy (float32); `kv` as
    in Attention, the caches [B, S, N, G, K] (expert KV) or [B, S, G, K] (shared KV)."""
    dt = jnp.dtype(self.cfg.dtype)
    probs_BxLxN = moa_lib.router_probs(x_BxLxD, self.router[...])
    gates_BxLxN = moa_lib.gates(probs_BxLxN, self.cfg.moa.top_k)
    moe_layer.sow(self, "attn_router_probs", probs_BxLxN)
    wq, wk, wv, wo = (w[...].astype(dt) for w in (self.wq, self.wk, self.wv, self.wo))
    q, k, v = moa_lib.project(x_BxLxD, wq, wk, wv, positions_BxL, inv_freq)
    k, v, new_kv = layers.with_cache(k, v, kv)
    y_BxLxD = moa_lib.attend(q, k.astype(dt), v.astype(dt), gates_BxLxN, wo, mask)
    return y_BxLxD, moa_lib.router_stats(probs_BxLxN, gates_BxLxN), new_kv

  def cache_shape(self, batch: int, slots: int) -> tuple[int, ...]:
    cfg = self.cfg
    experts = () if cfg.moa.shared_kv else (cfg.moa.num_experts,)
    return (batch, slots, *experts, cfg.n_kv_heads, cfg.head_dim)


class Block(nnx.Module):
  """Pre-norm decoder block, sequential or parallel (cfg.block); the attention is dense
  or a mixture of attention experts, the FFN dense or an MoE block."""

  def __init__(self, cfg: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = _ones((cfg.d_model,), ("norm",), pd)
    if layer_id in cfg.moa_layer_ids:
      self.attn = MoaAttention(cfg, rngs=rngs)
    else:
      self.attn = Attention(cfg, rngs=rngs)
    if cfg.block == "sequential":
      self.mlp_norm = _ones((cfg.d_model,), ("norm",), pd)
    if layer_id in cfg.moe_layer_ids:
      self.mlp = moe_layer.MoeBlock(cfg.moe, cfg.d_model, rngs=rngs, param_dtype=pd,
                                    dtype=jnp.dtype(cfg.dtype))
    else:
      self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask, inv_freq, *, train=False, key=None,
               kv=None):
    """(x_BxLxD, ffn stats, attention stats, new_kv); the stats are {} for dense parts,
    new_kv the updated KV cache when `kv` is given (see Attention), else None."""
    eps = self.cfg.rms_eps
    h_BxLxD = layers.rms_norm(x_BxLxD, self.attn_norm[...], eps)
    attn_BxLxD, attn_stats, new_kv = self.attn(h_BxLxD, positions_BxL, mask, inv_freq, kv)
    if self.cfg.block == "parallel":
      ffn_in_BxLxD = h_BxLxD
    else:
      x_BxLxD = x_BxLxD + attn_BxLxD
      ffn_in_BxLxD = layers.rms_norm(x_BxLxD, self.mlp_norm[...], eps)
    moe_layer.sow(self, "ffn_input", ffn_in_BxLxD)
    y_BxLxD, stats = self.mlp(ffn_in_BxLxD, train=train, key=key)
    if self.cfg.block == "parallel":
      y_BxLxD = y_BxLxD + attn_BxLxD
    x_BxLxD = sharding.constrain(x_BxLxD + y_BxLxD, ("batch", "length", "embed"))
    return x_BxLxD, stats, attn_stats, new_kv


class KVCache(NamedTuple):
  """Keys and values of the tokens generated so far: one (k, v) pair per layer, each
  [B, S, G, K] ([B, S, N, G, K] for attention experts with their own KV), which slots
  hold a real token, and the next slot to write."""
  kv: tuple[tuple[jax.Array, jax.Array], ...]
  valid_BxS: jax.Array
  index: jax.Array


class Transformer(nnx.Module):
  """Decoder-only LM. `__call__` returns (logits_BxLxV in float32, aux)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = _ones((cfg.d_model,), ("norm",), pd)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, *, train: bool = False,
               key: jax.Array | None = None):
    """Aux holds per-layer router statistics: the FFN's under aux["moe"][layer_id], the
    attention experts' under aux["moa"][layer_id].

    `key` seeds router jitter in training (folded with the layer index)."""
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)
    mask = layers.attention_mask(segment_ids_BxL, self.cfg.sliding_window)
    logits, aux, _ = self._forward(tokens_BxL, positions_BxL, mask, train, key)
    return logits, aux

  def init_cache(self, batch: int, slots: int) -> KVCache:
    """An empty KV cache of `slots` positions per row, in the compute dtype."""
    dt = jnp.dtype(self.cfg.dtype)
    self._check_layer_list()
    kv = tuple((jnp.zeros(b.attn.cache_shape(batch, slots), dt),) * 2 for b in self.layers)
    return KVCache(kv, jnp.zeros((batch, slots), bool), jnp.int32(0))

  def decode(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, cache: KVCache,
             real_BxL: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Inference on L new tokens per row that fill cache slots index .. index+L-1 and
    attend to every real token already there: the prefill (L = prompt length, index 0)
    and each decoding step (L = 1) of generation. `real_BxL` is false for padding (left
    padding of shorter prompts), which no later token attends to. Returns the logits
    [B, L, V] (float32) and the cache with the new keys and values."""
    self._check_layer_list()
    real_BxL = jnp.ones(tokens_BxL.shape, bool) if real_BxL is None else real_BxL
    valid_BxS = layers.write_cache(cache.valid_BxS, real_BxL, cache.index)
    mask = layers.cache_mask(valid_BxS, cache.index, tokens_BxL.shape[1], self.cfg.sliding_window)
    logits, _, kv = self._forward(tokens_BxL, positions_BxL, mask, False, None, cache)
    return logits, KVCache(kv, valid_BxS, cache.index + tokens_BxL.shape[1])

  def _check_layer_list(self):
    if isinstance(self.layers, layer_stack.LayerStack):
      raise ValueError("decoding needs the layers as a list of blocks: "
                       "layer_stack.unstack_layers(model)")

  def _forward(self, tokens_BxL, positions_BxL, mask, train, key, cache=None):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dt)
    x_BxLxD = sharding.constrain(x_BxLxD, ("batch", "length", "embed"))
    run_block = _remat_block(cfg.remat) if train and cache is None else _block
    blocks = self.layers
    if (cfg.scan_layers and cache is None and not isinstance(blocks, layer_stack.LayerStack)
        and not moe_layer.capturing(blocks[0])):  # stored per layer: stacked in the step
      blocks = layer_stack.LayerStack(list(blocks))
    if isinstance(blocks, layer_stack.LayerStack):  # training stores them so, no copy
      x_BxLxD, moe_stats, moa_stats, start = blocks.scan(
          x_BxLxD, positions_BxL, mask, inv_freq, key, train, cfg.remat)
      rest = list(blocks.tail)
    else:
      moe_stats, moa_stats, start, rest = {}, {}, 0, list(blocks)
    new_kv = [None] * start
    for i, block in enumerate(rest, start):
      layer_key = None if key is None else jax.random.fold_in(key, i)
      kv = None if cache is None else (*cache.kv[i], cache.index)
      x_BxLxD, stats, attn_stats, layer_kv = run_block(block, x_BxLxD, positions_BxL, mask,
                                                       inv_freq, layer_key, train, kv)
      new_kv.append(layer_kv)
      if stats:
        moe_stats[i] = stats
      if attn_stats:
        moa_stats[i] = attn_stats
    x_BxLxD = layers.rms_norm(x_BxLxD, self.final_norm[...], cfg.rms_eps)
    head_DxV = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(dt),
                        preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", "length", "vocab"))
    return logits, {"moe": moe_stats, "moa": moa_stats}, tuple(new_kv)


def _block(block: Block, x_BxLxD, positions_BxL, mask, inv_freq, key, train, kv):
  return block(x_BxLxD, positions_BxL, mask, inv_freq, train=train, key=key, kv=kv)


def _remat_block(remat: str):
  """`_block`, recomputed in the backward pass under cfg.remat's policy (or as it is)."""
  if remat == "none":
    return _block
  return nnx.remat(_block, policy=layer_stack.REMAT_POLICIES[remat], static_argnums=(6,))


@nnx.jit
def capture(model: Transformer, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
            segment_ids_BxL: jax.Array | None = None):
  """One inference forward pass (train=False) that also returns what the blocks record:
  (logits_BxLxV, {layer_id: {"ffn_input": x_BxLxD, ...}}), the FFN input after its RMSNorm
  for every layer, and for MoE layers also "router_logits" and "router_probs" [B, L, E],
  "experts" [B, L, K] int32 and "expert_weights" [B, L, K]; for attention-expert layers
  "attn_router_probs" [B, L, N]. Logits equal model(...)[0];
  params, state and plain calls of the model are untouched (nothing is sown outside this)."""
  (logits_BxLxV, _), state = nnx.capture(model, nnx.Intermediate)(
      tokens_BxL, positions_BxL, segment_ids_BxL)
  return logits_BxLxV, _by_layer(nnx.to_pure_dict(state))


def _by_layer(captured: dict) -> dict[int, dict[str, jax.Array]]:
  """{layer_id: {name: value}} from capture's nested {"layers": {i: {..., "mlp": {...}}}}."""
  out = {}
  for i, block in captured.get("layers", {}).items():
    out[int(i)] = ({k: v for k, v in block.items() if k not in ("mlp", "attn")}
                   | dict(block.get("mlp", {})) | dict(block.get("attn", {})))
  return dict(sorted(out.items()))


def create(cfg: ModelConfig, seed: int = 0,
           mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """A randomly initialised model: on the default device, or with `mesh` built directly
  sharded (each param initialised in place on its shards, never whole on one device)."""
  # One jit either way: eager init would compile every op of every param shape, each
  # at full optimisation (seconds per shape on CPU).
  return sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh)


def abstract(cfg: ModelConfig) -> Transformer:
  """Shapes and sharding metadata only, no memory: the target for loading weights."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
