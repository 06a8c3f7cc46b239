"""Lower every Pallas kernel, its gradient and the MoE layer (pallas backend) for GPU/TPU.

  python -m experiments.check_kernels --platforms=tpu,cuda

Runs on any machine (jax.export needs no accelerator). Prints `<kernel> <platform> ok`
or the error, one line each; the exit status is 1 if anything failed to lower.
"""
import sys

from absl import app, flags

from experiments import cli

from pallas_kernels import export_check

_PLATFORMS = flags.DEFINE_list("platforms", ["tpu", "cuda"], "Platforms to lower for.")


def main(argv):
  del argv
  unknown = sorted(set(_PLATFORMS.value) - set(export_check.KERNEL_CALL))
  if unknown:
    print(f"error: --platforms: unknown {unknown}; expected some of "
          f"{sorted(export_check.KERNEL_CALL)}", file=sys.stderr)
    sys.exit(1)
  sys.exit(0 if export_check.check_all(_PLATFORMS.value) else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
