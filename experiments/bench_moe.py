"""Forward+backward time of the MoE layer vs a dense SwiGLU FFN of equal active FLOPs.

  python -m experiments.bench_moe --T=8192 --d=512 --f=1024 --E=8 --k=2 --backend=dropless

The dense FFN has width k*f. The two alternate in one process after warm-up; the last
line printed is `ratio=<median MoE time / median dense time>` (then, with --gmm, the
grouped-matmul TFLOP/s of the Pallas gmm, jax.lax.ragged_dot and a dense matmul).
"""
from absl import app, flags

from experiments import cli

from moe_jax import bench

_T = flags.DEFINE_integer("T", 8192, "Tokens.")
_D = flags.DEFINE_integer("d", 512, "Model width.")
_F = flags.DEFINE_integer("f", 1024, "Expert width.")
_E = flags.DEFINE_integer("E", 8, "Experts.")
_K = flags.DEFINE_integer("k", 2, "Experts per token.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_BACKEND = flags.DEFINE_string("backend", "dropless", "Dispatch backend.")
_CF = flags.DEFINE_float("capacity_factor", 1.0, "Capacity factor (capacity backend).")
_ROUTER = flags.DEFINE_string("router", "topk_softmax", "Router.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repetitions of each.")
_GMM = flags.DEFINE_bool("gmm", False, "Also report TFLOP/s of one grouped matmul (T*k rows, "
                         "d -> f): Pallas gmm vs jax.lax.ragged_dot vs dense.")


def main(argv):
  del argv
  bench.bench_moe(_T.value, _D.value, _F.value, _E.value, _K.value, _DTYPE.value,
                  _BACKEND.value, _CF.value, _ROUTER.value, _REPEATS.value)
  if _GMM.value:
    bench.bench_gmm(_T.value * _K.value, _D.value, _F.value, _E.value, _DTYPE.value,
                    _REPEATS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
