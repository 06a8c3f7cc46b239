"""Which lowering a kernel is built for: Triton (GPU), Mosaic (TPU), or the interpreter.

Every kernel takes a `Target`. The ops modules take `target=None` by default, meaning
"decided by the platform the computation is lowered for": the call is staged out with
`jax.lax.platform_dependent`, so a CPU run uses the interpreter, while the same jitted
function exported for `cuda` or `tpu` lowers the real kernel (and only that branch).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

VARIANTS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class Target:
  variant: str      # "triton" (GPU kernels) or "mosaic" (TPU kernels)
  interpret: bool   # run the kernel body with the Pallas interpreter (CPU)

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"target.variant={self.variant!r}: expected one of {VARIANTS}")


INTERPRET = Target("triton", True)
PLATFORMS = {"cpu": INTERPRET, "cuda": Target("triton", False),
             "rocm": Target("triton", False), "tpu": Target("mosaic", False)}


def for_platform(platform: str) -> Target:
  """The target for a platform name as jax.export or jax.default_backend() spell it."""
  platform = {"gpu": "cuda"}.get(platform, platform)
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}: expected one of {sorted(PLATFORMS)}")
  return PLATFORMS[platform]


def default() -> Target:
  """The target for jax.default_backend() (interpreter on CPU)."""
  return for_platform(jax.default_backend())


def dispatch(fn: Callable, target: Target | None, *args):
  """fn(target, *args) for the given target, or for the lowering platform if None."""
  if target is not None:
    return fn(target, *args)
  branches = {p: functools.partial(fn, t) for p, t in PLATFORMS.items()}
  return jax.lax.platform_dependent(*args, default=functools.partial(fn, INTERPRET), **branches)


def compiler_params(target: Target, mosaic_semantics: tuple[str, ...], num_warps: int = 4,
                    num_stages: int = 1):
  """Backend compiler parameters; the Triton ones select the Triton lowering on GPU."""
  if target.variant == "mosaic":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=mosaic_semantics)
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()
