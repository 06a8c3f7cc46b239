"""python -m experiments.train --config=configs/train.py:runlocal --workdir=/tmp/train

Continued training of an upcycled (or dense) model. The starting point is `init`:
'' (the embedded SmolLM2-135M-Instruct), an HF dir, a .gguf, a moe_jax checkpoint (e.g.
experiments.upcycle's workdir), or 'scratch' (a small random model). With a dense start
and method != none, the model is upcycled on the fly by the `upcycle` section; with
method=merge (BTX) or bam (BAM), `init` lists one dense checkpoint per expert,
comma-separated, and they are merged on the fly (bam: attention experts per `moa`).
Arguments: method (none = dense | copy | virtual_group | partition | drop | noise |
merge | bam), experts, topk, granularity, router, lr, steps, runlocal, scratch.
"""
import ml_collections

from moe_jax.config_util import parse_arg


def args(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config arguments (module docstring), parsed: shared with the sweep configs."""
  return parse_arg(arg, method="copy", experts=8, topk=2, granularity=1, router="topk_softmax",
                   lr=1e-4, steps=200, runlocal=False, scratch=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = args(arg)
  c = ml_collections.ConfigDict()
  c.init = "scratch" if a.scratch else ""
  # init=scratch: the model's shape, and its vocabulary: '' = the embedded model's (49152
  # tokens), 'bpe:N' = a byte-level BPE of N tokens learned from the run's training text.
  # block: sequential (Llama) | parallel (GPT-J/PaLM: attention and FFN read one norm).
  c.scratch = ml_collections.ConfigDict(dict(
      d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
      max_seq_len=1024, tokenizer="", block="sequential"))
  c.upcycle = ml_collections.ConfigDict(dict(
      method=a.method, num_experts=a.experts, top_k=a.topk, granularity=a.granularity,
      router=a.router, norm_topk_prob=False, partition="random", output_scale=0.0,
      drop_ratio=0.5, drop_shared_indices=False, noise_std=0.02, shared_expert=False))
  c.layers = "all"                 # which layers become MoE
  # method=bam: attention experts in moa.layers (top_k 0 = soft, all experts; shared_kv:
  # one k/v projection, the sources' averaged).
  c.moa = ml_collections.ConfigDict(dict(top_k=0, shared_kv=False, layers="all"))
  c.router_init = "normal"
  c.router_std = 0.02
  c.moe = ml_collections.ConfigDict(dict(backend="dropless", capacity_factor=1.0,
                                         aux_loss_coeff=1e-2, z_loss_coeff=1e-3, jitter=0.0))
  c.dtype = "float32"
  # Activation memory: none | full (each block recomputed in the backward pass) |
  # save_dots (its matmul outputs kept, the rest recomputed). The same losses either way.
  c.remat = "none"
  # One lax.scan over the repeating unit of layers: compiles once per unit, not per layer
  # (and remat then saves only each unit's input). Checkpoints are the same either way.
  c.scan_layers = False
  # A resume (the workdir has a finished step) must match the saved run's config, except
  # for loop cadence, steps and mesh (moe_jax/train/init_plan.py RESUME_FREE). Deliberate
  # changes are named here, comma-separated keys or sections: 'optim.lr,optim.schedule'.
  c.resume_allow = ""
  # Device mesh (moe_jax/sharding.py); one axis may be -1 = the rest of the devices. The
  # batch splits over data*fsdp*expert; expert > 1 makes the MoE dispatch expert-parallel
  # (all_to_all over `expert`). Pod slice shapes: README "TPU pods", moe_jax/launch.py.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
  # data.source: stdlib (the embedded Python) | pydoc (the English pydoc topics) |
  # stdlib+pydoc (both, interleaved, each domain with its own held-out split) | a local .jsonl/.txt | hf:json:FILES,
  # hf:parquet:FILES, hf:text:FILES, hf:csv:FILES (read through `datasets`, FILES may be a
  # glob) | hf:<hub name>. `field` names the text column; the first 5% is held out for eval
  # unless the dataset has a validation or test split.
  c.data = ml_collections.ConfigDict(dict(source="stdlib", field="text", max_docs=0))
  c.loop = ml_collections.ConfigDict(dict(
      steps=a.steps, batch_size=8, seq_len=512, seed=0, log_every=10, eval_every=50,
      eval_batches=4, final_eval="batches", ckpt_every=50, keep=2, grad_accum=1, inject_nan_at_step=-1))
  c.optim = ml_collections.ConfigDict(dict(
      lr=a.lr, schedule="cosine", warmup_steps=10, total_steps=a.steps, decay_fraction=0.2,
      final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      router_lr_mult=1.0))
  if a.runlocal:  # minutes on a 2-core CPU: 3 MoE layers of 4 experts, short sequences
    c.scratch.tokenizer = "bpe:1024"  # a small vocabulary: the logits no longer dominate
    c.upcycle.num_experts = min(a.experts, 4)
    c.upcycle.top_k = min(a.topk, c.upcycle.num_experts)
    c.layers = "all" if a.scratch else "every:10"
    c.data.max_docs = 100
    c.loop.update(steps=min(a.steps, 20), batch_size=4, seq_len=128, log_every=5,
                  eval_every=10, eval_batches=2, ckpt_every=10)
    c.optim.update(total_steps=c.loop.steps, warmup_steps=2)
  return c
