"""Training throughput and MFU of a model shape, dense and upcycled, random weights.

  python -m experiments.bench_train --model=smollm2-135m --experts=0,8 --B=16 --L=2048 \
      --dtype=bfloat16 --backend=dropless,pallas

For each expert count of --experts (0 = the dense model) and, for MoEs, each backend of
--backend, builds the model of --model (moe_jax.bench.SHAPES: random weights, real
shapes; MoEs copy-upcycled in every layer, top --topk) and times the train step of
experiments.train on random tokens (moe_jax.bench.bench_train). Prints one `summary` line
per model with tokens/s, model TFLOP/s and MFU (against the device's dense bf16 peak);
--out writes every figure as JSON, rewritten after each model. --alternate builds every
model first and times them round by round in turn, so that their ratios are measured side
by side in time (on CPU, where a VM's speed drifts between models measured one after
another).
"""
from absl import app, flags

from experiments import cli
from moe_jax import bench, checkpoint

_MODEL = flags.DEFINE_enum("model", "smollm2-135m", sorted(bench.SHAPES), "Model shape.")
_EXPERTS = flags.DEFINE_list("experts", ["0", "8"], "Expert counts (0: dense).")
_TOPK = flags.DEFINE_integer("topk", 2, "Experts per token.")
_BACKEND = flags.DEFINE_list("backend", ["dropless"], "MoE dispatch backends.")
_B = flags.DEFINE_integer("B", 8, "Sequences per batch.")
_L = flags.DEFINE_integer("L", 2048, "Sequence length.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "Compute dtype (params stay --param_dtype; the router float32).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Param (and optimizer state) dtype.")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "save_dots"], "Remat policy.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Layers stored stacked, one scan.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round (--rounds rounds, the best).")
_ALTERNATE = flags.DEFINE_bool("alternate", False, "Build every model first, then time them "
                                "round by round in turn (bench.bench_train_alternating): ratios "
                                "side by side in time. Holds every model in memory at once.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per model; the best counts.")
_OUT = flags.DEFINE_string("out", "", "Also write the figures as JSON to this path.")


def _configs():
  """[(experts, backend, cfg)]: each model of the flags, dense first where 0 is asked."""
  out = []
  for e in (int(x) for x in _EXPERTS.value):
    for backend in _BACKEND.value if e else ["-"]:
      moe = {"backend": backend} if e else {}
      out.append((e, backend, bench.model_shape(_MODEL.value, e, _TOPK.value, **moe).replace(
          dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, remat=_REMAT.value,
          scan_layers=_SCAN.value)))
  return out


def main(argv):
  del argv
  result = {**bench.provenance("experiments.bench_train"), "alternated": _ALTERNATE.value,
            "runs": []}
  rows = result["runs"]

  def record(e, backend, r):
    rows.append({"model": _MODEL.value, "experts": e, "top_k": _TOPK.value if e else 0,
                 "backend": backend, "dtype": _DTYPE.value, "param_dtype": _PARAM_DTYPE.value,
                 "remat": _REMAT.value, "scan_layers": _SCAN.value, **r})
    if _OUT.value:  # after every model: a later one that fails leaves these
      cli.main_guard(checkpoint.write_json_atomic, _OUT.value, result)

  models = _configs()
  if _ALTERNATE.value:
    figures = bench.bench_train_alternating([cfg for _, _, cfg in models], _B.value, _L.value,
                                            _STEPS.value, _ROUNDS.value)
    for (e, backend, _), r in zip(models, figures):
      record(e, backend, r)
  else:
    for e, backend, cfg in models:
      record(e, backend, bench.bench_train(cfg, _B.value, _L.value, _STEPS.value, _ROUNDS.value))
  for r in rows:
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
    print(f"summary model={r['model']} experts={r['experts']} backend={r['backend']} "
          f"tokens_per_s={r['tokens_per_s']:.0f} model_tflops_per_s="
          f"{r['model_tflops_per_s']:.1f} mfu={mfu} step_ms={r['step_s'] * 1e3:.1f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
