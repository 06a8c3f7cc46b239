"""Run a sweep: python -m experiments.sweep --config=configs/sweep_experts.py:runlocal --workdir=DIR

The config module gives the base training config (`get_config(arg)`) and `sweep(arg)`,
a generator of override dicts; each run trains in DIR/<overrides>, finished runs are
skipped, then DIR/results.csv, results.md and PNG plots are written.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from moe_jax import config_util, runs, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "A sweep config module.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory.", required=True)


def run(config, workdir: str):
  path, _, arg = flags.FLAGS["config"].config_filename.partition(":")
  mod = config_util.load_module(path)
  os.makedirs(workdir, exist_ok=True)
  rows = sweep.run_sweep(config, mod.sweep(arg), workdir, runs.train)
  for p in sweep.write_results(rows, workdir, os.path.basename(path)[:-3]):
    print(f"plot: {p}")
  print(open(os.path.join(workdir, "results.md")).read())


def main(argv):
  del argv
  cli.main_guard(run, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
