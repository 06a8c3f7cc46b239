"""python -m experiments.sweep --config=configs/sweep_routing.py:runlocal --workdir=/tmp/sweep_routing

Routing order, with and without weight scaling: top-k-then-softmax vs softmax-then-top-k,
upcycled by plain copy (no scaling) or by virtual groups with G=1 (scale E/T for
softmax-then-top-k; 1 for top-k-then-softmax).
"""
from configs import train


def get_config(arg=None):
  return train.get_config(arg)


def sweep(arg=None):
  del arg
  for router in ("topk_softmax", "softmax_topk"):
    for method in ("copy", "virtual_group"):
      yield {"upcycle.router": router, "upcycle.method": method}
