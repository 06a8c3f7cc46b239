"""python -m experiments.study --config=configs/study/routing.py --workdir=runs/study/routing

Finding 2, routing order: topK-then-softmax against softmax-then-topK (with the
upcycling scale that keeps the function at step 0), copy-upcycled seed, 8 experts top-2.
Nemotron-4's upcycling found softmax-then-topK better; "Llama 3 Meets MoE" found
topK-then-softmax converges faster. Arguments: steps, runlocal.
"""
from configs.study import common
from moe_jax.config_util import parse_arg

COMPARISONS = (("softmax_topk", "topk_softmax"),)
SEEDS = 3


def _args(arg):
  return parse_arg(arg, steps=300, runlocal=False)


def get_config(arg=None):
  a = _args(arg)
  c = common.base(a.runlocal, 2 if a.runlocal else a.steps)
  c.upcycle.update(num_experts=8, top_k=2)
  return c


def shared(arg=None):
  yield common.seed_run(_args(arg).runlocal)


def arms(arg=None):
  del arg
  yield common.upcycled("topk_softmax", **{"upcycle.router": "topk_softmax"})
  yield common.upcycled("softmax_topk", **{"upcycle.router": "softmax_topk"})
