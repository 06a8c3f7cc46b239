"""Forward+backward time of the MoE layer vs a dense SwiGLU FFN of equal active FLOPs.

  python -m experiments.bench_moe --T=8192 --d=512 --repeats=5

Each shape E:f:k of --shapes (by default the coarse 8:1024:2 and the fine-grained
64:128:8 that the speed goals name; --E/--f/--k give one shape instead) runs with each
backend of --backend; the dense FFN has
width k*f. The MoE (router included) and the dense FFN alternate in one process after
warm-up, and each pair prints `ratio=<median MoE time / median dense time>`; the last
lines are one `summary` line per pair. With --gmm, also the grouped-matmul TFLOP/s of the
Pallas gmm, jax.lax.ragged_dot and a dense matmul at each shape. With --transformers
(needs the `hf` extra), also transformers' Mixtral sparse block on torch at each shape, in
a child process with the same threads, against its own dense SwiGLU; then each backend's
absolute time over the fastest transformers implementation. With --floor, also the experts
alone on rows already grouped into equal slabs against dense, forward and forward+backward:
what the narrower expert products cost with no routing at all. With --breakdown (pinned
to one core), also each layer's and dense's time split into products and the rest, thunk
by thunk. --out writes every figure as JSON (rewritten after each measurement).
"""
import json
import subprocess
import sys

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
_TRANSFORMERS = flags.DEFINE_list("transformers", [], "Also time transformers' Mixtral block "
                                  "with these experts implementations (eager, batched_mm, "
                                  "grouped_mm).")
_FLOOR = flags.DEFINE_bool("floor", False, "Also time the experts alone on rows already "
                            "grouped into equal slabs (no router, no permutation) against dense: "
                            "what the expert shapes cost by themselves (bench.bench_floor).")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also split each layer's and dense's time "
                                "into products and the rest, thunk by thunk, from a profiler "
                                "trace (bench.thunk_breakdown). Run pinned to one core "
                                "(taskset -c 0): only there do the thunks add up to the time.")
_TILINGS = flags.DEFINE_list("gmm_tilings", [], "--gmm: also time the Pallas gmm at these "
                             "tilings, bm:bk:bn or bm:bk:bn:num_warps:num_stages (Triton).")


def _ints(flag: str, text: str, lengths: tuple[int, ...], expected: str) -> tuple[int, ...]:
  """`text` as colon-separated positive integers, as many as one of `lengths`."""
  parts = text.split(":")
  if len(parts) not in lengths or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise app.UsageError(f"--{flag}={text!r}: expected {expected}, positive integers")
  return tuple(int(p) for p in parts)


def _shape(text: str) -> tuple[int, int, int]:
  return _ints("shapes", text, (3,), "experts:expert width:top-k (e.g. 64:128:8)")


def _tiling(text: str) -> tuple[int, ...]:
  return _ints("gmm_tilings", text, (3, 5), "bm:bk:bn or bm:bk:bn:num_warps:num_stages")


def _transformers(e: int, f: int, k: int) -> dict:
  """bench.bench_transformers in a child process (its torch threads apart from XLA's)."""
  args = (_T.value, _D.value, f, e, k, _DTYPE.value, _REPEATS.value, tuple(_TRANSFORMERS.value))
  code = f"import json; from moe_jax import bench; print(json.dumps(bench.bench_transformers{args}))"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"transformers block: {proc.stderr.strip().splitlines()[-1]}")
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"transformers {r['torch']} threads={r['threads']} E={e} f={f} k={k}: " + " ".join(
      f"{n}_s={v:.4f}" for n, v in r["seconds"].items()) + " " + " ".join(
      f"{n}_over_dense={v:.3f}" for n, v in r["ratio"].items()), flush=True)
  return r


def main(argv):
  del argv
  if _BREAKDOWN.value:
    if bench.usable_cores() != 1:
      raise app.UsageError("--breakdown: thunk times add up to a call's time only on one "
                           "core; run pinned to one, e.g. taskset -c 0")
    bench.enable_thunk_trace()
  shapes = [_shape(s) for s in _SHAPES.value]
  if any(v is not None for v in (_E.value, _F.value, _K.value)):
    shapes = [(_E.value or 8, _F.value or 1024, _K.value or 2)]
  result = {**bench.provenance("experiments.bench_moe"), "layer": [], "gmm": [],
            "transformers": [], "floor": []}

  def record(kind, figures):
    result[kind].append(figures)
    if _OUT.value:  # a later measurement that fails leaves these
      cli.main_guard(checkpoint.write_json_atomic, _OUT.value, result)

  for e, f, k in shapes:
    for backend in _BACKEND.value:
      record("layer", bench.bench_moe(_T.value, _D.value, f, e, k, _DTYPE.value, backend,
                                      _CF.value, _ROUTER.value, _REPEATS.value,
                                      _BREAKDOWN.value))
    if _FLOOR.value:
      record("floor", bench.bench_floor(_T.value, _D.value, f, e, k, _DTYPE.value,
                                        _REPEATS.value))
    if _TRANSFORMERS.value:
      record("transformers", _transformers(e, f, k))
    if _GMM.value:
      record("gmm", bench.bench_gmm(_T.value * k, _D.value, f, e, _DTYPE.value, _REPEATS.value,
                                    (None, *(_tiling(t) for t in _TILINGS.value))))
  peers = {(r["E"], r["f"], r["k"]): r for r in result["transformers"]}
  for r in result["layer"]:
    line = (f"summary E={r['E']} f={r['f']} k={r['k']} backend={r['backend']} "
            f"moe_over_dense={r['ratio']:.3f}")
    peer = peers.get((r["E"], r["f"], r["k"]))
    if peer:
      best = min(peer["ratio"], key=lambda n: peer["seconds"][n])
      line += (f" transformers_{best}_over_its_dense={peer['ratio'][best]:.3f} "
               f"moe_jax_over_transformers={r['moe_s'] / peer['seconds'][best]:.3f}")
    print(line)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
