"""python -m experiments.study --config=configs/study/init_methods.py --workdir=runs/study/init_methods

Finding 7, initialisation (Drop-Upcycling's claim, Nakamura et al. 2025): copy against
drop (r = 0.5), noise, and partition, each upcycling the seed into 8 experts top-2.
Arguments: steps, runlocal.
"""
from configs.study import common
from moe_jax.config_util import parse_arg

COMPARISONS = (("drop", "copy"), ("noise", "copy"), ("partition", "copy"))
SEEDS = 3


def _args(arg):
  return parse_arg(arg, steps=250, runlocal=False)


def get_config(arg=None):
  a = _args(arg)
  c = common.base(a.runlocal, 2 if a.runlocal else a.steps)
  c.upcycle.update(num_experts=8, top_k=2, drop_ratio=0.5)
  return c


def shared(arg=None):
  yield common.seed_run(_args(arg).runlocal)


def arms(arg=None):
  del arg
  for method in ("copy", "drop", "noise", "partition"):
    yield common.upcycled(method, **{"upcycle.method": method})
