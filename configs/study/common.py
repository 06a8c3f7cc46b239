"""What every finding shares: the seed dense model and the continued-training sizes.

The seed is a small dense model pre-trained here from scratch on the embedded text, the
standard library's Python and the pydoc topics in English (data.source=stdlib+pydoc, each
with its own held-out split), with a byte-level BPE learned from that text. It lives
beside the findings' workdirs (`<study root>/seed`, the shared run "../seed"), so it is
trained once and every finding starts from the same checkpoint. `runlocal` shrinks everything to a CI miniature.
"""
import ml_collections

from configs import train
from moe_jax import tokenizer
from moe_jax.config import ModelConfig
from moe_jax.config_util import parse_arg
from moe_jax.train import flops
from moe_jax.upcycle import convert, methods

SEED = "../seed"  # the shared run's directory, relative to a finding's workdir


def base(runlocal: bool, steps: int) -> ml_collections.ConfigDict:
  """The train config of every arm: the seed's shape, `steps` of continued training."""
  c = train.get_config(f"scratch,method=none,lr=3e-4,steps={steps}")
  c.scratch.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=512,
                   max_seq_len=512, tokenizer="bpe:4096")
  c.data.update(source="stdlib+pydoc", max_docs=0)  # Python and English, each held out
  c.loop.update(batch_size=16, seq_len=256, log_every=10, eval_every=max(steps // 10, 1),
                eval_batches=8, final_eval="split", ckpt_every=max(steps // 4, 1))
  c.optim.update(warmup_steps=max(steps // 20, 1), total_steps=steps)
  c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  if runlocal:
    c.scratch.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                     tokenizer="bpe:512")
    c.data.max_docs = 30
    c.loop.update(batch_size=2, seq_len=32, log_every=1, eval_every=1, eval_batches=1,
                  final_eval="batches", ckpt_every=steps)  # the whole split: ~3500 batches of 2x32
  return c


SEEDS = {"sequential": SEED, "parallel": "../seed_parallel"}  # a seed per block form


def seed_run(runlocal: bool, steps: int = 1600, block: str = "sequential") -> dict:
  """The shared pre-training run of the seed (dense, from scratch, a higher LR), with
  sequential blocks (every finding but 8) or parallel ones (BAM's seeds, finding 8)."""
  steps = 2 if runlocal else steps
  return {"name": SEEDS[block], "init": "scratch", "scratch.block": block,
          "upcycle.method": "none", "optim.lr": 1e-3,
          "loop.steps": steps, "optim.total_steps": steps, "loop.seed": 1000,
          "optim.warmup_steps": max(steps // 50, 1), "loop.ckpt_every": steps,
          "loop.eval_every": max(steps // 20, 1)}


def upcycled(name: str, **overrides) -> dict:
  """An arm that upcycles the seed (copy, the finding's experts) with `overrides`."""
  return {"name": name, "init": f"run:{SEED}", "upcycle.method": "copy", **overrides}


def finding_args(arg: str | None, steps: int, **defaults) -> ml_collections.ConfigDict:
  """A finding's config arguments: steps (of continued training), runlocal, and its own."""
  return parse_arg(arg, steps=steps, runlocal=False, **defaults)


def finding_config(a: ml_collections.ConfigDict, experts: int = 8,
                   **upcycle) -> ml_collections.ConfigDict:
  """`base` for a finding's arguments `a`: its steps (2 at runlocal), `experts` top-2
  unless `upcycle` says otherwise."""
  c = base(a.runlocal, 2 if a.runlocal else a.steps)
  c.upcycle.update({"num_experts": experts, "top_k": 2, **upcycle})
  return c


def shared(a: ml_collections.ConfigDict):
  """The runs every seed of a finding shares: the seed model."""
  yield seed_run(a.runlocal)


def interface(steps: int, upcycle: dict | None = None, **defaults):
  """(get_config, shared) of a finding module. Its arguments are steps, runlocal and
  `defaults` (`experts`, 8 unless given, is the upcycle's expert count); get_config(arg)
  is the base train config with the `upcycle` overrides, shared(arg) its shared runs."""
  def args(arg=None) -> ml_collections.ConfigDict:
    return finding_args(arg, steps=steps, **defaults)

  def get_config(arg=None) -> ml_collections.ConfigDict:
    a = args(arg)
    return finding_config(a, a.get("experts", 8), **(upcycle or {}))

  return get_config, lambda arg=None: shared(args(arg))


def flops_ratio(c: ml_collections.ConfigDict, method: str = "copy") -> float:
  """Training FLOPs per token of the MoE that config `c`'s upcycle section makes of the
  seed by `method`, over the dense seed's (the vocabulary taken at its requested size)."""
  shape = c.scratch.to_dict()
  dense = ModelConfig(vocab_size=tokenizer.bpe_vocab_size(shape.pop("tokenizer")), **shape)
  moe = convert.moe_model_config(dense, methods.UpcycleSpec(**{**c.upcycle, "method": method}), c.layers,
                                 **c.moe.to_dict())
  seq = c.loop.seq_len
  return flops.train_flops_per_token(moe, seq) / flops.train_flops_per_token(dense, seq)
