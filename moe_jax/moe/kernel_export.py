"""Lower every kernel op (forward and gradient) and the whole MoE layer for GPU and TPU on
any machine, with jax.export: the check behind experiments/check_kernels.py.

The ops are called with `target=None`, so the lowering platform picks the kernel (only
that branch of `lax.platform_dependent` is lowered); a lowered module must contain the
platform's kernel custom call (Triton on cuda, Mosaic on tpu), which an interpreted
kernel would not have.
"""
from __future__ import annotations

import types
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax.moe import layer
from moe_jax.moe.config import MoeConfig
from pallas_kernels.gmm import ops as gmm_ops
from pallas_kernels.permute import ops as permute_ops
from pallas_kernels.router import kernel as router_kernel, ops as router_ops

KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "rocm": "__gpu$xla.gpu.triton",
               "tpu": "tpu_custom_call"}
T, D, F, E, K = 64, 128, 256, 8, 2


def _sum_sq(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(tree)
             if jnp.issubdtype(a.dtype, jnp.floating))


def _grad(fn: Callable, argnums) -> Callable:
  return jax.grad(lambda *a: _sum_sq(fn(*a)), argnums=argnums)


def _router_cases() -> dict:
  out = {}
  for name in router_kernel.ROUTERS:
    cfg = types.SimpleNamespace(router=name, top_k=K, norm_topk_prob=True,
                                topk_scaling_factor=2.0)
    fn = lambda l, b, cfg=cfg: tuple(router_ops.route(l, cfg, b))
    args = (jax.ShapeDtypeStruct((T, E), jnp.float32), jax.ShapeDtypeStruct((E,), jnp.float32))
    out[f"router_{name}"] = (fn, args)
    out[f"router_{name}_grad"] = (_grad(fn, 0), args)
  return out


def _moe_cases(dtype) -> dict:
  cfg = MoeConfig(num_experts=E, top_k=K, expert_dim=F, backend="pallas")
  fn = lambda x, r, wg, wu, wd: layer.moe_forward(x, r, wg, wu, wd, cfg, dtype=dtype)
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  args = (s(T, D), s(D, E), s(E, D, F), s(E, D, F), s(E, F, D))
  tag = jnp.dtype(dtype).name
  return {f"moe_layer_{tag}": (fn, args),
          f"moe_layer_{tag}_grad": (_grad(lambda *a: fn(*a)[0], (0, 1, 2, 3, 4)), args)}


def cases() -> dict[str, tuple[Callable, tuple]]:
  """name -> (function, abstract arguments)."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  ids = jax.ShapeDtypeStruct((T, K), jnp.int32)
  sizes = jax.ShapeDtypeStruct((E,), jnp.int32)
  permute = lambda x, ex: permute_ops.permute(x, permute_ops.plan(ex, E))
  unpermute = lambda ys, w, ex: permute_ops.unpermute(ys, w, permute_ops.plan(ex, E))
  gmm = lambda lhs, rhs, gs: gmm_ops.gmm(lhs, rhs, gs)
  out = _router_cases()
  out.update({
      "permute": (permute, (f32(T, D), ids)),
      "permute_grad": (_grad(permute, 0), (f32(T, D), ids)),
      "unpermute": (unpermute, (f32(T * K, D), f32(T, K), ids)),
      "unpermute_grad": (_grad(unpermute, (0, 1)), (f32(T * K, D), f32(T, K), ids)),
      "gmm": (gmm, (f32(T * K, D), f32(E, D, F), sizes)),
      "gmm_grad": (_grad(gmm, (0, 1)), (f32(T * K, D), f32(E, D, F), sizes)),
  })
  out.update(_moe_cases(jnp.float32))
  out.update(_moe_cases(jnp.bfloat16))
  return out


def lower(fn: Callable, args: tuple, platform: str) -> str:
  """The exported StableHLO text of jit(fn) for `platform`."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(KERNEL_CALL[platform])]
  exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
  return exported.mlir_module()


def check(name: str, fn: Callable, args: tuple, platform: str) -> str | None:
  """None if `fn` lowers for `platform` with its kernel custom call, else one line."""
  try:
    text = lower(fn, args, platform)
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
  if KERNEL_CALL[platform] not in text:
    return f"no {KERNEL_CALL[platform]} custom call in the lowered module"
  return None


def check_all(platforms: list[str], report: Callable[[str], None] = print) -> bool:
  """Lowers every case for every platform, reporting `<name> <platform> ok` or the error."""
  ok = True
  for name, (fn, args) in cases().items():
    for platform in platforms:
      err = check(name, fn, args, platform)
      ok &= err is None
      report(f"{name} {platform} {'ok' if err is None else err}")
  return ok
