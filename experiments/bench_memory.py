"""Compile time and temporary memory of the training gradient: scanned layers and remat.

  python -m experiments.bench_memory --experts=8 --L=2048

The embedded SmolLM2-135M upcycled into `experts` experts (top-2) in all 30 layers,
abstract params (shapes only); for the Python loop, the scan over layers stored per layer
(stacked inside the step) and the scan over layers stored stacked (the train step's layout
with scan_layers), without and with remat, `jax.jit(grad).lower(...).compile()` is timed
and its `memory_analysis()` read, in one process. The last lines print the ratios
(targets: the scan compiles at least 3x faster than the loop; full remat needs at most
1/3 of no remat's temporary bytes).
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
  variants = [(layout, remat) for layout in bench.LAYOUTS for remat in ("none", "full")]
  variants.append(("stacked", "save_dots"))
  r = bench.compile_memory(cfg, _B.value, _L.value, variants)
  for layout in bench.LAYOUTS[1:]:
    ratio = r[("loop", "none")]["compile_s"] / r[(layout, "none")]["compile_s"]
    print(f"loop_over_{layout}_compile_ratio={ratio:.2f}")
  for layout in bench.LAYOUTS:
    ratio = r[(layout, "full")]["temp_bytes"] / r[(layout, "none")]["temp_bytes"]
    print(f"{layout}_full_remat_over_none_temp_ratio={ratio:.3f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
