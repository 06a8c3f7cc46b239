"""Check the Pallas kernels: lower them for GPU/TPU, or run them here against references.

  python -m experiments.check_kernels --platforms=tpu,cuda       # lowering, any machine
  python -m experiments.check_kernels --run --dtypes=float32,bfloat16 \
      --T=4096 --d=1024 --f=512 --E=8 --k=2                        # on this platform

Lowering (jax.export needs no accelerator) prints `<kernel> <platform> ok` or the error,
one line each. --run runs every kernel, forward and backward, on this machine's platform
(the real Triton/Mosaic kernels on a GPU/TPU, the interpreter on CPU) against plain-jnp
references (moe_jax/moe/kernel_check.py) and prints each relative error against its
dtype's bound; --out also writes them as JSON. The exit status is 1 if anything failed.
"""
import sys

import jax
from absl import app, flags

from experiments import cli

from moe_jax import bench, checkpoint
from moe_jax.moe import kernel_check, kernel_export

_PLATFORMS = flags.DEFINE_list("platforms", ["tpu", "cuda"], "Platforms to lower for.")
_RUN = flags.DEFINE_bool("run", False, "Run the kernels here instead of lowering them.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "--run: input dtypes.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "--run: fresh random draws per dtype.")
_T = flags.DEFINE_integer("T", 96, "--run: tokens.")
_D = flags.DEFINE_integer("d", 32, "--run: model width.")
_F = flags.DEFINE_integer("f", 24, "--run: expert width.")
_E = flags.DEFINE_integer("E", 4, "--run: experts.")
_K = flags.DEFINE_integer("k", 2, "--run: experts per token.")
_OUT = flags.DEFINE_string("out", "", "--run: also write the errors as JSON to this path.")


def run() -> bool:
  sizes = kernel_check.Sizes(_T.value, _D.value, _F.value, _E.value, _K.value)
  print(f"platform={jax.default_backend()} device={jax.devices()[0].device_kind} {sizes}")
  result = {**bench.provenance("experiments.check_kernels"), "platform": jax.default_backend(),
            "sizes": vars(sizes), "checks": []}
  for dtype in _DTYPES.value:
    bound = kernel_check.TOLERANCE[dtype]
    for seed in range(_SEEDS.value):
      errors = {}
      for name, err in kernel_check.run_all(sizes, dtype, seed, errors).items():
        result["checks"].append({"dtype": dtype, "seed": seed, "check": name, "rel_err": err,
                                 "bound": bound, "ok": err <= bound})
        print(f"{dtype} seed={seed} {name:<30} rel_err={err:.2e} "
              f"{'ok' if err <= bound else f'FAIL (bound {bound:.0e})'}", flush=True)
      for name, err in errors.items():
        result["checks"].append({"dtype": dtype, "seed": seed, "check": name, "error": err,
                                 "bound": bound, "ok": False})
        print(f"{dtype} seed={seed} {name:<30} FAIL {err}", flush=True)
  if _OUT.value:
    cli.main_guard(checkpoint.write_json_atomic, _OUT.value, result)
  return all(c["ok"] for c in result["checks"])


def main(argv):
  del argv
  if _RUN.value:
    unknown = sorted(set(_DTYPES.value) - set(kernel_check.TOLERANCE))
    if unknown:
      print(f"error: --dtypes: unknown {unknown}; expected some of "
            f"{sorted(kernel_check.TOLERANCE)}", file=sys.stderr)
      sys.exit(1)
    sys.exit(0 if run() else 1)
  unknown = sorted(set(_PLATFORMS.value) - set(kernel_export.KERNEL_CALL))
  if unknown:
    print(f"error: --platforms: unknown {unknown}; expected some of "
          f"{sorted(kernel_export.KERNEL_CALL)}", file=sys.stderr)
    sys.exit(1)
  sys.exit(0 if kernel_export.check_all(_PLATFORMS.value) else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
