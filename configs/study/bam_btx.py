"""python -m experiments.study --config=configs/study/bam_btx.py --workdir=runs/study/bam_btx

Finding 8, BAM against BTX (Zhang et al. 2024): a parallel-block seed (BAM's seeds are
parallel-attention transformers) is branched into a Python expert (data.source=stdlib)
and an English one (data.source=pydoc); the seed and both branches are merged into one
MoE of 3 experts, FFN top-1 weighted by its softmax probability, and trained on the
mixture. BTX (upcycle.method=merge)
averages the attention; BAM (method=bam) makes the three attentions soft attention
experts, each with its own k and v or with k and v shared. Data-matched: every arm
merges the same three models and then sees the same batches. Arguments: steps,
branch_steps, runlocal.
"""
from configs.study import common

FINDING = 8
TITLE = "BAM against BTX on domain branches"
QUESTION = ("Merging a seed and its Python and English branches into an MoE, does BAM "
            "(the branches' attention as soft attention experts) reach a lower held-out "
            "loss on each domain than BTX (attention averaged), on the same data?")
CLAIM = ("BAM (Zhang et al., arXiv 2408.08274), 590M seeds, perplexity averaged over four "
         "domains, data-matched: BTX 10.72, BAM with expert KV 9.70, with shared KV 10.32 "
         "(seed 13.91): BAM < BTX, and expert KV < shared KV.")
EXPECTED = {("bam", "btx"): "lower", ("bam_shared_kv", "btx"): "lower",
            ("bam", "bam_shared_kv"): "lower"}

COMPARISONS = (("bam", "btx"), ("bam_shared_kv", "btx"), ("bam", "bam_shared_kv"))
SEEDS = 3

SEED = common.SEEDS["parallel"]
BRANCHES = {"branch_python": "stdlib", "branch_english": "pydoc"}  # the domain branches
SOURCES = ",".join(f"run:{r}" for r in (SEED, *BRANCHES))  # expert j = source j's FFN

ARGS = {"steps": 200, "experts": len(BRANCHES) + 1, "branch_steps": 250}
# BAM's FFN routing: top-1, the expert's output times its probability p_i(x) over all
# experts (softmax_topk), so the language-model loss trains the router; topk_softmax at
# top-1 would weigh every choice 1 and leave the router to the balance losses alone.
get_config, _ = common.interface(upcycle={"top_k": 1, "router": "softmax_topk"}, **ARGS)


def shared(arg=None):
  """The parallel seed, then each branch: the seed trained on one domain alone."""
  a = common.finding_args(arg, **ARGS)
  yield common.seed_run(a.runlocal, block="parallel")
  steps = 2 if a.runlocal else a.branch_steps
  for name, source in BRANCHES.items():
    yield {"name": name, "init": f"run:{SEED}", "upcycle.method": "none",
           "data.source": source, "loop.steps": steps, "optim.total_steps": steps,
           "optim.warmup_steps": max(steps // 20, 1), "loop.ckpt_every": steps}


def arms(arg=None):
  del arg
  yield {"name": "btx", "init": SOURCES, "upcycle.method": "merge"}
  yield {"name": "bam", "init": SOURCES, "upcycle.method": "bam"}
  yield {"name": "bam_shared_kv", "init": SOURCES, "upcycle.method": "bam",
         "moa.shared_kv": True}
