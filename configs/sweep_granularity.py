"""python -m experiments.sweep --config=configs/sweep_granularity.py:runlocal --workdir=/tmp/sweep_g

Granularity at fixed active parameters: virtual-group upcycling with E = 4G experts of
width f/G and top-G routing, so every token passes through f FFN neurons; G in 1, 2, 4, 8.
"""
from configs import train


def get_config(arg=None):
  config = train.get_config(arg)
  config.upcycle.method = "virtual_group"
  return config


def sweep(arg=None):
  runlocal = train.args(arg).runlocal
  for g in ((1, 2) if runlocal else (1, 2, 4, 8)):
    yield {"upcycle.granularity": g, "upcycle.num_experts": 4 * g, "upcycle.top_k": g}
