"""Run one finding of the reproduction study, every arm over several seeds.

  python -m experiments.study --config=configs/study/upcycling.py --workdir=runs/study/upcycling

The config module (configs/study/*.py) gives get_config(arg), shared(arg), arms(arg),
COMPARISONS and SEEDS (moe_jax/study.py). Finished runs are skipped; results.csv,
results.md and the loss plots are written to the workdir.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from moe_jax import config_util, runs, study

_CONFIG = config_flags.DEFINE_config_file("config", None, "A study config module.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The finding's directory.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 0, "Seeds per arm (0: the module's SEEDS).")


def run(config, workdir: str, seeds: int) -> None:
  path, _, arg = flags.FLAGS["config"].config_filename.partition(":")
  mod = config_util.load_module(path)
  seeds = seeds or mod.SEEDS
  os.makedirs(workdir, exist_ok=True)
  rows = study.run_study(config, mod.arms(arg), mod.shared(arg), seeds, workdir, runs.train)
  for p in study.write_results(rows, mod.COMPARISONS, workdir, os.path.basename(path)[:-3]):
    print(f"plot: {p}")
  print(open(os.path.join(workdir, "results.md")).read())


def main(argv):
  del argv
  cli.main_guard(run, _CONFIG.value, _WORKDIR.value, _SEEDS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
