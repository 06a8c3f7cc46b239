"""Forward+backward time of the MoE layer vs a dense SwiGLU FFN of equal active FLOPs.

  python -m experiments.bench_moe --T=8192 --d=512 --repeats=5

Each shape E:f:k of --shapes (by default the coarse 8:1024:2 and the fine-grained
64:128:8 that the speed goals name; --E/--f/--k give one shape instead) runs with each
backend of --backend; the dense FFN has
width k*f. The MoE (router included) and the dense FFN alternate in one process after
warm-up, and each pair prints `ratio=<median MoE time / median dense time>`; the last
lines are one `summary` line per pair. With --gmm, also the grouped-matmul TFLOP/s of the
Pallas gmm, jax.lax.ragged_dot and a dense matmul at each shape. --out writes every
figure as JSON (rewritten after each measurement).
"""
from absl import app, flags

from experiments import cli

from moe_jax import bench, checkpoint

_T = flags.DEFINE_integer("T", 8192, "Tokens.")
_D = flags.DEFINE_integer("d", 512, "Model width.")
_SHAPES = flags.DEFINE_list("shapes", ["8:1024:2", "64:128:8"],
                            "Shapes as experts:expert width:top-k.")
_E = flags.DEFINE_integer("E", None, "Experts: with --f and --k (default 8, 1024, 2), one "
                          "shape instead of --shapes.")
_F = flags.DEFINE_integer("f", None, "Expert width (see --E).")
_K = flags.DEFINE_integer("k", None, "Experts per token (see --E).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_BACKEND = flags.DEFINE_list("backend", ["dropless", "capacity"], "Dispatch backends.")
_CF = flags.DEFINE_float("capacity_factor", 1.0, "Capacity factor (capacity backend).")
_ROUTER = flags.DEFINE_string("router", "topk_softmax", "Router.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repetitions of each.")
_GMM = flags.DEFINE_bool("gmm", False, "Also report TFLOP/s of one grouped matmul (T*k rows, "
                         "d -> f): Pallas gmm vs jax.lax.ragged_dot vs dense.")
_OUT = flags.DEFINE_string("out", "", "Also write the figures as JSON to this path.")
_TILINGS = flags.DEFINE_list("gmm_tilings", [], "--gmm: also time the Pallas gmm at these "
                             "tilings, bm:bk:bn or bm:bk:bn:num_warps:num_stages (Triton).")


def _shape(text: str) -> tuple[int, int, int]:
  parts = text.split(":")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise app.UsageError(f"--shapes={text!r}: expected experts:expert width:top-k, "
                         "positive integers (e.g. 64:128:8)")
  return tuple(int(p) for p in parts)


def _tiling(text: str) -> tuple[int, ...]:
  parts = text.split(":")
  if len(parts) not in (3, 5) or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise app.UsageError(f"--gmm_tilings={text!r}: expected bm:bk:bn or "
                         "bm:bk:bn:num_warps:num_stages, positive integers")
  return tuple(int(p) for p in parts)


def main(argv):
  del argv
  shapes = [_shape(s) for s in _SHAPES.value]
  if any(v is not None for v in (_E.value, _F.value, _K.value)):
    shapes = [(_E.value or 8, _F.value or 1024, _K.value or 2)]
  result = {**bench.provenance("experiments.bench_moe"), "layer": [], "gmm": []}

  def record(kind, figures):
    result[kind].append(figures)
    if _OUT.value:  # a later measurement that fails leaves these
      cli.main_guard(checkpoint.write_json_atomic, _OUT.value, result)

  for e, f, k in shapes:
    for backend in _BACKEND.value:
      record("layer", bench.bench_moe(_T.value, _D.value, f, e, k, _DTYPE.value, backend,
                                      _CF.value, _ROUTER.value, _REPEATS.value))
    if _GMM.value:
      record("gmm", bench.bench_gmm(_T.value * k, _D.value, f, e, _DTYPE.value, _REPEATS.value,
                                    (None, *(_tiling(t) for t in _TILINGS.value))))
  for r in result["layer"]:
    print(f"summary E={r['E']} f={r['f']} k={r['k']} backend={r['backend']} "
          f"moe_over_dense={r['ratio']:.3f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
