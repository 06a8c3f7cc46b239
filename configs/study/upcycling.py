"""python -m experiments.study --config=configs/study/upcycling.py --workdir=runs/study/upcycling

Finding 1, the sparse-upcycling claim (Komatsuzaki et al. 2023): from the seed, the model
upcycled (copy, 8 experts top-2, every layer) against the seed continued dense and against
an MoE of the same shape trained from scratch, on the same tokens. Arguments: steps
(continued training), experts, runlocal (the CI miniature: 2 steps).
"""
from configs.study import common

COMPARISONS = (("upcycled", "dense"), ("upcycled", "scratch_moe"))
SEEDS = 3


def _args(arg):
  return common.finding_args(arg, steps=300, experts=8)


def get_config(arg=None):
  a = _args(arg)
  return common.finding_config(a, a.experts)


def shared(arg=None):
  return common.shared(_args(arg))


def arms(arg=None):
  del arg
  yield common.upcycled("upcycled")
  yield {"name": "dense", "init": f"run:{common.SEED}", "upcycle.method": "none"}
  yield {"name": "scratch_moe", "init": "scratch", "upcycle.method": "copy"}
