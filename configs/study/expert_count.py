"""python -m experiments.study --config=configs/study/expert_count.py --workdir=runs/study/expert_count

Finding 5, expert count: the seed copy-upcycled into E in {2, 4, 8, 16, 32, 64} experts,
top-2 (equal active parameters, total parameters growing with E). Arguments: steps,
runlocal.
"""
from configs.study import common

FINDING = 5
TITLE = "Expert count at top-2"
QUESTION = ("At equal active parameters (top-2), how does the held-out loss of the "
            "upcycled seed fall with the number of experts E, and where do returns diminish?")
CLAIM = ("Nemotron-4 upcycling: more experts help, with 64 a sweet spot and diminishing "
         "returns beyond it.")
COUNTS = (2, 4, 8, 16, 32, 64)
COMPARISONS = tuple((f"e{e}", f"e{e // 2}") for e in COUNTS[1:])
EXPECTED = {pair: "lower" for pair in COMPARISONS}
AXIS = ("upcycle.num_experts", "experts E")
SEEDS = 3
# The committed runs went one process per core, side by side (the results page says so).
PROCESSES = 2


get_config, shared = common.interface(steps=150)


def arms(arg=None):
  del arg
  for e in COUNTS:
    yield common.upcycled(f"e{e}", **{"upcycle.num_experts": e})
