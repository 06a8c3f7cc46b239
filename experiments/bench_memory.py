"""Compile time and temporary memory of the training gradient: scanned layers and remat.

  python -m experiments.bench_memory --experts=8 --L=2048

The embedded SmolLM2-135M upcycled into `experts` experts (top-2) in all 30 layers,
abstract params (shapes only); for the Python loop and the scan, without and with
remat, `jax.jit(grad).lower(...).compile()` is timed and its `memory_analysis()` read,
in one process. The last lines print the two ratios (targets: the scan compiles at least
3x faster than the loop; full remat needs at most 1/3 of no remat's temporary bytes).
"""
from absl import app, flags

from experiments import cli
from moe_jax import bench
from moe_jax.convert import load
from moe_jax.upcycle import convert, methods

_EXPERTS = flags.DEFINE_integer("experts", 8, "Experts per layer (top-2, every layer).")
_B = flags.DEFINE_integer("B", 1, "Sequences per batch.")
_L = flags.DEFINE_integer("L", 2048, "Sequence length.")


def main(argv):
  del argv
  dense = load.open_source("").cfg
  cfg = convert.moe_model_config(dense, methods.UpcycleSpec("copy", _EXPERTS.value, 2))
  print(f"SmolLM2-135M upcycled: {cfg.n_layers} layers of {_EXPERTS.value} experts top-2, "
        f"batch {_B.value}x{_L.value}")
  variants = [(False, "none"), (False, "full"), (True, "none"), (True, "full"),
              (True, "save_dots")]
  r = bench.compile_memory(cfg, _B.value, _L.value, variants)
  compile_ratio = r[(False, "none")]["compile_s"] / r[(True, "none")]["compile_s"]
  print(f"loop_over_scan_compile_ratio={compile_ratio:.2f}")
  for scan in (False, True):
    ratio = r[(scan, "full")]["temp_bytes"] / r[(scan, "none")]["temp_bytes"]
    print(f"{'scan' if scan else 'loop'}_full_remat_over_none_temp_ratio={ratio:.3f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
