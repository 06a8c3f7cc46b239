"""Forward+backward time of a soft Mixture of Attention (BAM) vs N dense attentions.

  python -m experiments.bench_moa --B=4 --L=512 --d=512 --heads=8 --kv_heads=8 --N=4

Both run in one process, alternating after warm-up; the last line printed is
`ratio=<median MoA time / (N x median time of one dense attention of the same shape)>`
(the target: at most 1.2).
"""
from absl import app, flags

from experiments import cli

from moe_jax import bench

_B = flags.DEFINE_integer("B", 4, "Sequences.")
_L = flags.DEFINE_integer("L", 512, "Sequence length.")
_D = flags.DEFINE_integer("d", 512, "Model width.")
_H = flags.DEFINE_integer("heads", 8, "Query heads.")
_G = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_N = flags.DEFINE_integer("N", 4, "Attention experts.")
_SHARED = flags.DEFINE_bool("shared_kv", False, "One k/v projection for all experts.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repetitions of each.")


def main(argv):
  del argv
  bench.bench_moa(_B.value, _L.value, _D.value, _H.value, _G.value, _N.value, _SHARED.value,
                  _DTYPE.value, _REPEATS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
