"""python -m experiments.study --config=configs/study/granularity.py --workdir=runs/study/granularity

Finding 3, granularity: virtual-group upcycling of the seed with G in {1, 2, 4, 8} shards
per FFN, 8G experts of width F/G, top-2G, so every arm has the same total (8 F) and active
(2 F) expert parameters per layer and the same function at step 0. Arguments: steps,
runlocal.
"""
from configs.study import common

FINDING = 3
TITLE = "Granularity at fixed active parameters"
QUESTION = ("At equal total and active parameters, do more and smaller experts (virtual "
            "groups of G shards) train the upcycled seed to a lower loss?")
CLAIM = ("Nemotron-4 upcycling and Megatron-Core's fine-grained upcycling (He et al. 2024): "
         "higher granularity helps, with the router duplicated across each virtual group "
         "so that the upcycled model starts as the dense one.")
GRANULARITIES = (1, 2, 4, 8)
COMPARISONS = tuple((f"g{g}", "g1") for g in GRANULARITIES[1:])
EXPECTED = {pair: "lower" for pair in COMPARISONS}
AXIS = ("upcycle.granularity", "granularity G")
SEEDS = 3


get_config, shared = common.interface(steps=200, upcycle={"method": "virtual_group"})


def arms(arg=None):
  del arg
  for g in GRANULARITIES:
    yield common.upcycled(f"g{g}", **{"upcycle.method": "virtual_group",
                                      "upcycle.granularity": g, "upcycle.num_experts": 8 * g,
                                      "upcycle.top_k": 2 * g})
