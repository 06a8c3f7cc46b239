"""python -m experiments.analyze --config=configs/analyze.py --config.checkpoint=C --workdir=W

What the experts of an MoE checkpoint learned (the analyses of "A Closer Look into
Mixture-of-Experts in LLMs", plus distance to the base model): analysis.json, PNG figures
and report.md in the workdir. `checkpoint` is any MoE checkpoint the loader reads (a
moe_jax upcycle, a train workdir or step, an HF Mixtral / Qwen-MoE directory);
`reference` is the dense model the experts came from ('' = from the provenance, 'none' =
no reference). Arguments: runlocal (2 windows, no domain pass).
"""
import ml_collections

from moe_jax.config_util import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.checkpoint = ""            # required: the MoE checkpoint
  c.reference = ""             # '' = from the provenance; 'none' = no reference
  c.text_file = ""             # '' = the embedded evaluation text (pydoc_data.topics)
  c.windows = 8                # windows of seq_len tokens for the dynamic analyses; 0 = skip
  c.seq_len = 512
  c.batch_size = 2
  c.detail_layers = "auto"     # neuron reordering + PCA: auto (first, middle, last) | all | 0,5
  c.domain_windows = 2         # windows each of Python code and English prose
  c.prompt = "def greet(name):\n    return f'Hello, {name}!'  # says hello"
  c.overwrite = False
  if a.runlocal:
    c.windows, c.domain_windows = 2, 1
  return c
