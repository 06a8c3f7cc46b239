"""python -m experiments.sweep --config=configs/chain_upcycle.py:runlocal --workdir=/tmp/chain

A chained experiment in one command: the dense model continued for `n` steps
(`dense`), then that checkpoint upcycled (copy, `experts` experts top-2) and trained `m`
more steps (`moe`), next to the same checkpoint trained `m` more steps dense
(`dense_more`). The second stage draws its batches with another data seed, so it
continues on tokens the first stage did not see; both of its arms see the same ones.
Arguments: n, m, experts, runlocal, scratch (a small random dense model as the start).
"""
from configs import train
from moe_jax.config_util import parse_arg


def _args(arg):
  return parse_arg(arg, n=100, m=100, experts=8, runlocal=False, scratch=False)


def get_config(arg=None):
  a = _args(arg)
  c = train.get_config(",".join(["method=none", f"experts={a.experts}"]
                                + ["runlocal"] * a.runlocal + ["scratch"] * a.scratch))
  c.layers = "all"
  return c


def sweep(arg=None):
  a = _args(arg)
  n, m = (min(a.n, 10), min(a.m, 10)) if a.runlocal else (a.n, a.m)
  stage2 = {"init": "run:dense", "loop.steps": m, "optim.total_steps": m, "loop.seed": 1}
  yield {"name": "moe", **stage2, "upcycle.method": "copy"}
  yield {"name": "dense", "loop.steps": n, "optim.total_steps": n}
  yield {"name": "dense_more", **stage2}
