"""python -m experiments.study --config=configs/study/init_methods.py --workdir=runs/study/init_methods

Finding 7, initialisation (Drop-Upcycling's claim, Nakamura et al. 2025): copy against
drop (r = 0.5), noise, and partition, each upcycling the seed into 8 experts top-2.
Arguments: steps, runlocal.
"""
from configs.study import common

COMPARISONS = (("drop", "copy"), ("noise", "copy"), ("partition", "copy"))
SEEDS = 3


def _args(arg):
  return common.finding_args(arg, steps=250)


def get_config(arg=None):
  return common.finding_config(_args(arg), drop_ratio=0.5)


def shared(arg=None):
  return common.shared(_args(arg))


def arms(arg=None):
  del arg
  for method in ("copy", "drop", "noise", "partition"):
    yield common.upcycled(method, **{"upcycle.method": method})
