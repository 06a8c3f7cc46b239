"""python -m experiments.upcycle --config=configs/upcycle.py:method=virtual_group,experts=8,granularity=1,topk=2 --workdir=/tmp/moe

Turns a dense checkpoint (default: the embedded SmolLM2-135M-Instruct) into an MoE
checkpoint in the workdir, streaming one tensor in and one layer out at a time, then
prints dense and upcycled perplexity on the embedded evaluation text side by side.
Arguments: method (copy | virtual_group | partition | drop | noise | merge | bam), experts,
granularity, topk (default 2; 1 for bam, as in the paper), router (topk_softmax |
softmax_topk | sigmoid_bias), router_init (normal | zeros | kmeans | hidden), runlocal.

Several dense models into one (one checkpoint per expert, of one shape):
  method=merge (BTX): FFN experts from the sources, everything else averaged.
  method=bam (BAM): also attention experts from the sources, mixed by a soft router:
    --config=configs/upcycle.py:method=bam,experts=4 --config.merge_sources=a,b,c,d
    --config.moa.shared_kv=True   (one k/v for all experts; q and o per expert)
    --config.moa.top_k=2          (0 = soft routing over all experts, the paper's default)
"""
import ml_collections

from moe_jax.config_util import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, method="copy", experts=8, granularity=1, topk=0, router="topk_softmax",
                router_init="normal", runlocal=False)
  topk = a.topk or (1 if a.method == "bam" else 2)
  c = ml_collections.ConfigDict()
  c.source = ""                 # HF dir or .gguf; '' = the embedded model
  c.merge_sources = ""          # merge, bam: comma-separated dense checkpoints, one per expert
  c.merge_base = -1             # merge: non-FFN params from this source (-1 = average)
  # bam: attention experts in `layers` (all experts, softmax weights when top_k = 0)
  c.moa = ml_collections.ConfigDict(dict(top_k=0, shared_kv=False, layers="all"))
  c.block = ""                  # '' = the source's block form (it cannot change: same function)
  c.upcycle = ml_collections.ConfigDict(dict(
      method=a.method, num_experts=a.experts, top_k=topk, granularity=a.granularity,
      router=a.router, norm_topk_prob=False, partition="random", output_scale=0.0,
      drop_ratio=0.5, drop_shared_indices=False, noise_std=0.02, shared_expert=False))
  c.layers = "all"              # which layers become MoE: all | every:N | 0,3,5
  c.backend = "dropless"        # dispatch backend recorded in the checkpoint
  c.router_init = a.router_init
  c.router_std = 0.02
  c.hidden_prompts = ""         # router_init=hidden: one prompt per router column, '|'-separated
  c.calib_windows = 4           # router_init=kmeans: windows of calibration text
  c.seed = 0
  c.eval_windows = 4            # windows of 512 tokens for the side-by-side perplexity; 0 = skip
  c.overwrite = False
  if a.runlocal:
    c.eval_windows = 1
  return c
