"""lm-evaluation-harness's command line with the `moe_jax` model and bundled tasks:

  python -m experiments.harness --model moe_jax --model_args checkpoint=PATH \
      --batch_size 8 --tasks pydoc_next [--limit N] [--output_path DIR]

Every flag is the harness's (`lm_eval --help`); PATH is anything moe_jax reads ('' = the
embedded SmolLM2). Needs the `eval` extra. See moe_jax/harness.py. A bad checkpoint or
model argument is one line on stderr and exit status 1 (experiments/cli.py).
"""
from experiments import cli
from moe_jax import harness

if __name__ == "__main__":
  cli.main_guard(harness.main)
