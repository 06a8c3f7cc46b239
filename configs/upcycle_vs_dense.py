"""python -m experiments.sweep --config=configs/upcycle_vs_dense.py:runlocal --workdir=/tmp/uvd

The sparse-upcycling comparison in one command: from the same start, the model upcycled
(copy, `experts` experts top-2, every layer) and the dense model, each trained `steps`
steps on the same tokens in the same order. The start is `config.init` (the embedded
SmolLM2 by default, or any checkpoint the loader reads); with `scratch`, a small dense
model first pre-trained here for `pretrain` steps (run `seed`).
Arguments: steps, experts, pretrain, runlocal, scratch.
"""
from configs import train
from moe_jax.config_util import parse_arg


def _args(arg):
  return parse_arg(arg, steps=200, experts=8, pretrain=200, runlocal=False, scratch=False)


def get_config(arg=None):
  a = _args(arg)
  c = train.get_config(",".join([f"steps={a.steps}", f"experts={a.experts}"]
                                + ["runlocal"] * a.runlocal + ["scratch"] * a.scratch))
  c.layers = "all"
  return c


def sweep(arg=None):
  a = _args(arg)
  start = {}
  if a.scratch:
    steps = min(a.pretrain, 10) if a.runlocal else a.pretrain
    yield {"name": "seed", "upcycle.method": "none", "loop.steps": steps,
           "optim.total_steps": steps, "loop.seed": 1}
    start = {"init": "run:seed"}
  yield {"name": "upcycled", **start, "upcycle.method": "copy"}
  yield {"name": "dense", **start, "upcycle.method": "none"}
