"""python -m experiments.sweep --config=configs/sweep_experts.py:runlocal --workdir=/tmp/sweep_experts

Expert count: continued dense training as the baseline, then copy-upcycled SmolLM2 with
E in 2..64 experts (top-2), all on the same tokens.
"""
from configs import train


def get_config(arg=None):
  return train.get_config(arg)


def sweep(arg=None):
  runlocal = train.args(arg).runlocal
  yield {"upcycle.method": "none"}
  for e in ((2, 4) if runlocal else (2, 4, 8, 16, 32, 64)):
    yield {"upcycle.method": "copy", "upcycle.num_experts": e, "upcycle.top_k": min(2, e)}
