"""python -m experiments.study --config=configs/study/upcycling.py --workdir=runs/study/upcycling

Finding 1, the sparse-upcycling claim (Komatsuzaki et al. 2023): from the seed, the model
upcycled (copy, 8 experts top-2, every layer) against the seed continued dense and against
an MoE of the same shape trained from scratch, on the same tokens; and against the dense
seed continued for as many training FLOPs as the upcycled model spends (dense_flops, more
steps of the same batch). Arguments: steps (continued training), experts, runlocal (the CI
miniature: 2 steps).
"""
from configs.study import common

FINDING = 1
TITLE = "Sparse upcycling against dense continuation and an MoE from scratch"
QUESTION = ("Does a copy-upcycled MoE (8 experts, top-2) learn more from the same tokens "
            "than the dense seed trained on, and than an MoE of the same shape trained from "
            "scratch? And at equal training FLOPs, since the MoE costs more per token: "
            "dense_flops continues the seed for as many FLOPs as the upcycled run spends.")
CLAIM = ("Komatsuzaki et al. (sparse upcycling, T5 and ViT): upcycled models beat dense "
         "continuation at about 50% of the dense pre-training cost, and beat MoEs trained "
         "from scratch on the same budget. Nemotron-4 15B upcycled on 1T tokens: MMLU 67.6 "
         "against 65.3 for the dense model continued.")
EXPECTED = {("upcycled", "dense"): "lower", ("upcycled", "scratch_moe"): "lower",
            ("upcycled", "dense_flops"): "lower"}

COMPARISONS = (("upcycled", "dense"), ("upcycled", "scratch_moe"), ("upcycled", "dense_flops"))
SEEDS = 3
# The committed runs went one process per core, side by side (the results page says so).
PROCESSES = 2


get_config, shared = common.interface(steps=300, experts=8)


def arms(arg=None):
  c = get_config(arg)
  steps = round(c.loop.steps * common.flops_ratio(c))  # the dense steps of the MoE's FLOPs
  yield common.upcycled("upcycled")
  yield {"name": "dense", "init": f"run:{common.SEED}", "upcycle.method": "none"}
  yield {"name": "scratch_moe", "init": "scratch", "upcycle.method": "copy"}
  yield {"name": "dense_flops", "init": f"run:{common.SEED}", "upcycle.method": "none",
         "loop.steps": steps, "optim.total_steps": steps}
