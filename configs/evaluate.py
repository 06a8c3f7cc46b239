"""python -m experiments.evaluate --config=configs/evaluate.py --workdir=/tmp/eval

Perplexity of a checkpoint on an evaluation text, and optionally a greedy completion.
Arguments: `runlocal` (a few windows only). Examples:
  --config.checkpoint=path/to/hf_dir | model.gguf | moe_jax_ckpt | train_workdir
                      | train_workdir/checkpoints/<step>   ('' = embedded SmolLM2)
  --config.moe.backend=dropless   (evaluate a capacity-trained MoE without drops)
  --config.eval_file=notes.txt   ('' = the embedded pydoc text)
  --config.prompt="def fibonacci(n):"
  --config.tasks=pydoc_next,my_task.yaml   (lm-evaluation-harness tasks, `eval` extra:
                      harness names, moe_jax's bundled ones, or YAML paths; results in
                      workdir/lm_eval.json)
"""
import ml_collections

from moe_jax.config_util import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.checkpoint = ""          # '' = the embedded SmolLM2-135M-Instruct GGUF
  c.eval_file = ""           # '' = the embedded evaluation text (pydoc_data.topics)
  c.seq_len = 512
  c.max_windows = 0          # 0 = every window
  c.batch_size = 4
  c.dtype = "float32"
  c.prompt = ""              # non-empty: also print a greedy completion
  c.max_new_tokens = 32
  c.tasks = ""               # comma-separated harness tasks; '' = perplexity only
  c.task_limit = 0           # 0 = every doc of each task
  c.num_fewshot = -1         # -1 = each task's default
  # MoE dispatch at evaluation: '' / 0 keep the checkpoint's (moe_jax.runs.eval_overrides).
  c.moe = ml_collections.ConfigDict(dict(backend="", capacity_factor=0.0))
  if a.runlocal:
    c.max_windows = 8
    c.task_limit = 40
  return c
