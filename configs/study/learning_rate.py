"""python -m experiments.study --config=configs/study/learning_rate.py --workdir=runs/study/learning_rate

Finding 4, learning rate: the copy-upcycled seed (8 experts, top-2) continued at five peak
learning rates, from a fine-tuning one to three times the seed's own pre-training peak
(1e-3); the final loss and the experts' cosine to the seed's FFN against the rate.
Arguments: steps, runlocal.
"""
from configs.study import common

FINDING = 4
TITLE = "Learning rate, and how far the experts move from the seed"
QUESTION = ("Which peak learning rate trains the upcycled seed best, and does a higher rate "
            "leave the experts less similar to the dense FFN they were copied from?")
CLAIM = ("Nemotron-4 upcycling: a learning rate as high as pre-training's (not a fine-tuning "
         "one) is needed, and higher learning rates give a lower cosine similarity between "
         "the base and the upcycled weights.")
RATES = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
COMPARISONS = tuple((f"lr{r:g}", "lr3e-05") for r in RATES[1:])
EXPECTED = {("lr0.001", "lr3e-05"): "lower"}
AXIS = ("optim.lr", "peak learning rate")
SEEDS = 3
# The committed runs went one process per core, side by side (the results page says so).
PROCESSES = 2


get_config, shared = common.interface(steps=200)


def arms(arg=None):
  del arg
  for r in RATES:
    yield common.upcycled(f"lr{r:g}", **{"optim.lr": r})
