"""python -m experiments.study --config=configs/study/init_methods.py --workdir=runs/study/init_methods

Finding 7, initialisation (Drop-Upcycling's claim, Nakamura et al. 2025): copy against
drop (r = 0.5), noise, and partition, each upcycling the seed into 8 experts top-2.
Arguments: steps, runlocal.
"""
from configs.study import common

FINDING = 7
TITLE = "Initialisation: copy, drop, noise and partition"
QUESTION = ("Does re-initialising half of each expert's neurons (Drop-Upcycling, r = 0.5) "
            "train to a lower loss than copying the FFN into every expert, and how do noise "
            "and neuron partitioning compare?")
CLAIM = ("Drop-Upcycling (Nakamura et al., ICLR 2025): r = 0.5 was best, and drop beats naive "
         "(copy) upcycling in long training because the experts diversify; copy is ahead "
         "early. Noise and partition are this framework's other initialisations (no claim).")
EXPECTED = {("drop", "copy"): "lower"}

COMPARISONS = (("drop", "copy"), ("noise", "copy"), ("partition", "copy"))
SEEDS = 3


get_config, shared = common.interface(steps=250, upcycle={"drop_ratio": 0.5})


def arms(arg=None):
  del arg
  for method in ("copy", "drop", "noise", "partition"):
    yield common.upcycled(method, **{"upcycle.method": method})
