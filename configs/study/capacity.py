"""python -m experiments.study --config=configs/study/capacity.py --workdir=runs/study/capacity

Finding 6, capacity factor: the copy-upcycled seed (8 experts, top-2) trained with expert
capacity C = ceil(N k / E * CF) for CF in {1, 2, 4} (assignments beyond it dropped by
probability) and dropless. Held-out loss is measured with the arm's own dispatch; the
table's tokens/s is the training throughput. Arguments: steps, runlocal.
"""
from configs.study import common

FINDING = 6
TITLE = "Capacity factor against dropless"
QUESTION = ("What does dropping tokens at capacity factor 1, 2 or 4 cost in loss against "
            "dropless dispatch, and what does it buy in step time?")
CLAIM = ("\"Llama 3 Meets MoE\" (27B tokens; MFU / MMLU 5-shot): dense continued 52.4 / 62.4, "
         "dropless 39.6 / 63.3, CF4 39.4 / 63.5, CF2 39.2 / 64.0, CF1 46.8 / 63.7: quality "
         "within about 0.7 points, CF1 the fastest MoE.")
FACTORS = (1, 2, 4)
COMPARISONS = tuple((f"cf{f}", "dropless") for f in FACTORS)
AXIS = ("moe.capacity_factor", "capacity factor")
SEEDS = 3
# The committed runs went one process per core, side by side, and (RAN) on the CPU path:
# the results page says both beside their times.
PROCESSES = 2
RAN = ("capacity went through the block loop with dropped assignments left out "
       "(`capacity_grouped`), the CPU `capacity` path since 2026-12-04")


get_config, shared = common.interface(steps=250)


def arms(arg=None):
  del arg
  for f in FACTORS:
    yield common.upcycled(f"cf{f}", **{"moe.backend": "capacity", "moe.capacity_factor": f})
  yield common.upcycled("dropless", **{"moe.backend": "dropless"})
