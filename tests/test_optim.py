"""The optimiser takes its learning rate at each update: the same updates and state as
optax.adamw with the schedule built in, and one update rule (so one compiled step) for
configs that differ only in LR or schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.train import optim

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "attn_norm": jnp.ones(4),
          "router": jnp.full((4, 2), 0.5)}


def _grads(i):
  return jax.tree.map(lambda p: jnp.sin(p * (i + 1)) + 0.1 * i, PARAMS)


@pytest.mark.parametrize("c", [
    optim.OptimConfig(lr=1e-2, warmup_steps=2, total_steps=6),
    optim.OptimConfig(lr=3e-3, schedule="wsd", warmup_steps=1, total_steps=6, clip_norm=0.0),
])
def test_updates_equal_optax_adamw_with_its_schedule(c):
  adamw = optax.adamw(optim.schedule(c), c.b1, c.b2, c.eps, weight_decay=c.weight_decay,
                      mask=lambda p: {k: k != "attn_norm" for k in p})
  ref = optax.chain(*([optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm else []), adamw)
  tx, lr_at = optim.make_tx(c), optim.schedule(c)
  p_ref = p_got = PARAMS
  s_ref, s_got = ref.init(PARAMS), tx.init(PARAMS)
  for i in range(6):
    u_ref, s_ref = ref.update(_grads(i), s_ref, p_ref)
    u_got, s_got = tx.update(_grads(i), s_got, p_got, lr=lr_at(i))
    p_ref, p_got = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_got, u_got)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  jax.tree.map(close, p_got, p_ref)
  jax.tree.map(close, s_got, s_ref)  # the same state tree: checkpoints restore either way


def test_one_update_rule_for_any_lr_or_schedule():
  a = optim.make_tx(optim.OptimConfig(lr=1e-3, total_steps=10))
  b = optim.make_tx(optim.OptimConfig(lr=5e-4, schedule="wsd", warmup_steps=0, total_steps=99))
  assert a is b
  assert optim.make_tx(optim.OptimConfig(weight_decay=0.0)) is not a
  with pytest.raises(TypeError, match=r"tx.update\(..., lr=\)"):
    a.update(_grads(0), a.init(PARAMS), PARAMS)


def test_router_lr_mult_scales_only_the_router():
  c = optim.OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0)
  base, mult = optim.make_tx(c), optim.make_tx(optim.OptimConfig(
      lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0, router_lr_mult=0.25))
  u0, _ = base.update(_grads(1), base.init(PARAMS), PARAMS, lr=1e-2)
  u1, _ = mult.update(_grads(1), mult.init(PARAMS), PARAMS, lr=1e-2)
  np.testing.assert_allclose(u1["router"], 0.25 * u0["router"], rtol=1e-6)
  np.testing.assert_array_equal(u1["w"], u0["w"])
