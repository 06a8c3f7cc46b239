"""python -m experiments.study --config=configs/study/upcycling.py --workdir=runs/study/upcycling

Finding 1, the sparse-upcycling claim (Komatsuzaki et al. 2023): from the seed, the model
upcycled (copy, 8 experts top-2, every layer) against the seed continued dense and against
an MoE of the same shape trained from scratch, on the same tokens. Arguments: steps
(continued training), experts, runlocal (the CI miniature: 2 steps).
"""
from configs.study import common
from moe_jax.config_util import parse_arg

COMPARISONS = (("upcycled", "dense"), ("upcycled", "scratch_moe"))
SEEDS = 3


def _args(arg):
  return parse_arg(arg, steps=300, experts=8, runlocal=False)


def get_config(arg=None):
  a = _args(arg)
  c = common.base(a.runlocal, 2 if a.runlocal else a.steps)
  c.upcycle.update(num_experts=a.experts, top_k=2)
  return c


def shared(arg=None):
  yield common.seed_run(_args(arg).runlocal)


def arms(arg=None):
  start = {"init": f"run:{common.SEED}"}
  yield common.upcycled("upcycled")
  yield {"name": "dense", **start, "upcycle.method": "none"}
  yield {"name": "scratch_moe", "init": "scratch", "upcycle.method": "copy"}
