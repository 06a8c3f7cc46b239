"""python -m experiments.sweep --config=configs/sweep_lr.py:runlocal --workdir=/tmp/sweep_lr

Learning rate of continued training of a copy-upcycled model.
"""
from configs import train


def get_config(arg=None):
  return train.get_config(arg)


def sweep(arg=None):
  runlocal = train.args(arg).runlocal
  for lr in ((1e-4, 1e-3) if runlocal else (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)):
    yield {"optim.lr": lr}
