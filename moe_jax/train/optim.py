"""Optimiser: AdamW with warmup + cosine or warmup-stable-decay, clipping, a decay mask
(no decay on norms and biases) and an optional learning-rate multiplier for routers.

The learning rate is an argument of the update (`tx.update(..., lr=...)`), computed on the
host from `schedule(c)`, not a constant in the step's program: one compiled train step
serves every LR, warmup and schedule length (an LR sweep, a resume at a new LR)."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

NO_DECAY = {"attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "bq", "bk", "bv",
            "router_bias"}
ROUTER = {"router"}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-4
  schedule: str = "cosine"         # cosine | wsd | constant
  warmup_steps: int = 10
  total_steps: int = 100
  decay_fraction: float = 0.2      # wsd: the final fraction of steps that decays
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0           # 0 = no clipping
  router_lr_mult: float = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"config.optim.schedule={self.schedule!r}: expected one of "
                       f"{sorted(SCHEDULES)}")
    if self.total_steps < 1 or self.warmup_steps < 0:
      raise ValueError(f"config.optim.total_steps={self.total_steps}/warmup_steps={self.warmup_steps}: "
                       "expected total >= 1 and warmup >= 0")
    ranges = {  # key: (low, high, high included)
        "lr": (0.0, math.inf, False), "eps": (0.0, math.inf, False),
        "b1": (0.0, 1.0, False), "b2": (0.0, 1.0, False),
        "decay_fraction": (0.0, 1.0, True), "final_lr_fraction": (0.0, 1.0, True),
        "weight_decay": (0.0, math.inf, False), "clip_norm": (0.0, math.inf, False),
        "router_lr_mult": (0.0, math.inf, False)}
    positive = {"lr", "eps"}
    for key, (low, high, high_ok) in ranges.items():
      v = getattr(self, key)
      ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v > low if key in positive else v >= low) and (v <= high if high_ok else v < high))
      if not ok:
        want = (f"a finite value {'>' if key in positive else '>='} {low:g}" +
                (f" and {'<=' if high_ok else '<'} {high:g}" if math.isfinite(high) else ""))
        raise ValueError(f"config.optim.{key}={v!r}: expected {want}")
    if self.lr * self.weight_decay >= 1.0:  # AdamW scales params by 1 - lr * wd each step
      raise ValueError(f"config.optim.lr={self.lr:g} x weight_decay={self.weight_decay:g} = "
                       f"{self.lr * self.weight_decay:g}: expected < 1 (decoupled weight decay "
                       "multiplies the params by 1 - lr * weight_decay every step)")


def _cosine(c: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      0.0, c.lr, max(c.warmup_steps, 1), max(c.total_steps, c.warmup_steps + 1),
      end_value=c.lr * c.final_lr_fraction)


def _wsd(c: OptimConfig) -> optax.Schedule:
  decay = max(int(c.total_steps * c.decay_fraction), 1)
  stable = max(c.total_steps - c.warmup_steps - decay, 0)
  return optax.join_schedules([
      optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1)),
      optax.constant_schedule(c.lr),
      optax.linear_schedule(c.lr, c.lr * c.final_lr_fraction, decay),
  ], boundaries=[max(c.warmup_steps, 1), max(c.warmup_steps, 1) + stable])


def _constant(c: OptimConfig) -> optax.Schedule:
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1)),
                               optax.constant_schedule(c.lr)], [max(c.warmup_steps, 1)])


SCHEDULES = {"cosine": _cosine, "wsd": _wsd, "constant": _constant}


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def _mask(names: set[str], include: bool):
  def fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: (_leaf_name(p) in names) == include, params)
  return fn


def schedule(c: OptimConfig) -> optax.Schedule:
  return SCHEDULES[c.schedule](c)


def scale_by_lr_arg() -> optax.GradientTransformationExtraArgs:
  """updates * -lr, with `lr` given to update(): optax's scale_by_learning_rate for a
  schedule (same state, a step count; same product), but with the value passed in."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, lr=None, **extra):
    del params, extra
    if lr is None:
      raise TypeError("this optimizer takes the learning rate at each update: tx.update(..., lr=)")
    updates = jax.tree.map(lambda g: jnp.asarray(-lr, g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def make_tx(c: OptimConfig) -> optax.GradientTransformationExtraArgs:
  """The update rule of `c`, without its learning rate (see the module docstring). Configs
  that differ only in LR or schedule get the same object, so a jitted step that holds it
  as static state is traced and compiled once for all of them."""
  return _tx(c.clip_norm, c.b1, c.b2, c.eps, c.weight_decay, c.router_lr_mult)


@functools.lru_cache(maxsize=16)
def _tx(clip_norm, b1, b2, eps, weight_decay, router_lr_mult):
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.chain(  # optax.adamw's three parts, the LR scale taking its value
      optax.scale_by_adam(b1, b2, eps),
      optax.add_decayed_weights(weight_decay, _mask(NO_DECAY, include=False)),
      scale_by_lr_arg()))
  if router_lr_mult != 1.0:
    parts.append(optax.masked(optax.scale(router_lr_mult), _mask(ROUTER, include=True)))
  return optax.chain(*parts)
