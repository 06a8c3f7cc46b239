"""python -m experiments.train --config=configs/study/seed.py --workdir=runs/study/seed

The study's seed dense model on its own (the run every finding shares, configs/study/
common.py): deterministic, about 27 minutes on the 2-core CPU. The study binary trains
the same run itself when `<study root>/seed` is missing. Arguments: steps, runlocal,
block (sequential, or parallel: finding 8's seed, `<study root>/seed_parallel`).
"""
from configs.study import common
from moe_jax import sweep
from moe_jax.config_util import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, steps=1600, runlocal=False, block="sequential")
  run = {k: v for k, v in common.seed_run(a.runlocal, a.steps, a.block).items() if k != "name"}
  return sweep.apply(common.base(a.runlocal, 2), run)
