"""python -m experiments.study --config=configs/study/routing.py --workdir=runs/study/routing

Finding 2, routing order: topK-then-softmax against softmax-then-topK (with the
upcycling scale that keeps the function at step 0), copy-upcycled seed, 8 experts top-2.
Nemotron-4's upcycling found softmax-then-topK better; "Llama 3 Meets MoE" found
topK-then-softmax converges faster. Arguments: steps, runlocal.
"""
from configs.study import common

FINDING = 2
TITLE = "Routing order: softmax-then-topK against topK-then-softmax"
QUESTION = ("Which routing order trains the copy-upcycled seed (8 experts, top-2) to the "
            "lower held-out loss on the same tokens?")
CLAIM = ("Nemotron-4 upcycling (15B): softmax-then-topK is better than topK-then-softmax. "
         "\"Llama 3 Meets MoE\" (arXiv 2412.09952): topK-then-softmax starts lower and "
         "converges faster (a curve, no number). The expected sign below is Nemotron's.")
EXPECTED = {("softmax_topk", "topk_softmax"): "lower"}

COMPARISONS = (("softmax_topk", "topk_softmax"),)
SEEDS = 3


get_config, shared = common.interface(steps=300)


def arms(arg=None):
  del arg
  yield common.upcycled("topk_softmax", **{"upcycle.router": "topk_softmax"})
  yield common.upcycled("softmax_topk", **{"upcycle.router": "softmax_topk"})
