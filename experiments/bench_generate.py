"""Tokens/s of greedy generation with the KV cache against a full forward per token.

  python -m experiments.bench_generate --new_tokens=256 --out=docs/results/generate_smollm2.json

On the embedded SmolLM2-135M-Instruct, in one process, alternating after the warm-ups
compile. It also checks that both produce the same tokens, on the dense model and on its
8-expert top-2 copy upcycle of every layer (`--check_tokens` of them). It prints
`speedup=<uncached time / cached time>` (the target: at least 10).
"""
from absl import app, flags

from experiments import cli

from moe_jax import bench, checkpoint

_NEW = flags.DEFINE_integer("new_tokens", 256, "Tokens generated per run.")
_CHECK = flags.DEFINE_integer("check_tokens", 64, "Tokens compared on the upcycled model.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Experts of the upcycle checked (0: none).")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs of each, after the warm-up compiles.")
_OUT = flags.DEFINE_string("out", "", "Also write the figures as JSON to this path.")


def main(argv):
  del argv
  result = bench.bench_generate(_NEW.value, _CHECK.value, _PROMPT.value, _REPEATS.value,
                                _EXPERTS.value)
  if _OUT.value:
    result.update(bench.provenance("experiments.bench_generate"))
    cli.main_guard(checkpoint.write_json_atomic, _OUT.value, result)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
