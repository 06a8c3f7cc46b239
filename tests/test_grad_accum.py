"""Gradient accumulation: K microbatches give the update of one step on the whole batch,
with the load-balancing loss of the global batch (not each microbatch's own)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.models import llama
from moe_jax.moe.config import MoeConfig
from moe_jax.train import optim, step

MOE = MoeConfig(num_experts=4, top_k=2, expert_dim=8, backend="dropless", aux_loss_coeff=0.1,
                z_loss_coeff=1e-3)
CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                  ffn_dim=32, max_seq_len=16, moe=MOE)


def _batch(rows=8, length=12):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (rows, length + 1)).astype(np.int32)
  mask = (rng.random((rows, length)) > 0.2).astype(np.float32)  # uneven tokens per row
  return jax.tree.map(jnp.asarray, {
      "tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
      "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
      "segment_ids": np.ones((rows, length), np.int32)})


def _step(accum, steps=2):
  model = llama.create(CFG, seed=3)
  opt = nnx.Optimizer(model, optim.make_tx(optim.OptimConfig()), wrt=nnx.Param)
  out = [step.train_step(model, opt, _batch(), jax.random.key(0), 1e-2, accum=accum)
         for _ in range(steps)]
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), out


def _close(a, b):
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_microbatch_gradients_equal_the_big_batch(accum=4):
  model = llama.create(CFG, seed=3)
  batch = _batch()
  (want_loss, want), want_g = nnx.value_and_grad(
      lambda m: step.loss_fn(m, batch, key=None), has_aux=True)(model)
  (got_loss, got), got_g = nnx.jit(step.grad_accumulate, static_argnums=3)(
      model, batch, jax.random.key(0), accum)
  jax.tree.map(_close, nnx.to_pure_dict(got_g), nnx.to_pure_dict(want_g))
  _close(got_loss, want_loss)
  for key in ("ce", "aux_loss", "z_loss", "tokens"):
    _close(got[key], want[key])
  jax.tree.map(_close, got["moe"], want["moe"])


def test_train_steps_with_accumulation_equal_the_big_batch():
  """Two optimiser steps. AdamW divides by the gradient's scale, so a rounding-level
  difference on a near-zero gradient entry grows into its update: the params agree within
  1e-5, a thousandth of one step at lr 1e-2 (2.0e-6 measured on one CPU, under 1e-6 on
  another); the gradients themselves agree within 1e-6 (the test above)."""
  want_params, want = _step(1)
  got_params, got = _step(2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-6),
               got_params, want_params)
  for g, w in zip(got, want):
    for key in ("loss", "grad_norm"):
      _close(g[key], w[key])


def test_global_aux_loss_is_not_the_mean_of_microbatch_aux_losses():
  """The check above can fail: each microbatch's own aux loss (its own expert load)
  averages to another value than the global batch's."""
  model = llama.create(CFG, seed=3)
  aux = nnx.jit(lambda m, b: step.loss_fn(m, b, key=None)[1]["aux_loss"])
  whole = aux(model, _batch())
  micro = step.microbatches(_batch(), 4)
  parts = [aux(model, jax.tree.map(lambda x: x[j], micro)) for j in range(4)]
  assert abs(float(np.mean(parts)) - float(whole)) > 1e-4


def test_grad_accum_must_divide_the_batch():
  from moe_jax.train import loop  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="config.loop.grad_accum=3 does not divide config.loop.batch_size=8"):
    loop.LoopConfig(batch_size=8, grad_accum=3)
