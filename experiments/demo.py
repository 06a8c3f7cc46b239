"""The main job on the embedded defaults (`make demo`): the research loop end to end.

SmolLM2-135M-Instruct's perplexity and a completion; its upcycling into 8 experts top-2
(dense vs upcycled perplexity); continued training of an MoE upcycled on the fly next to
the dense model on the same tokens; the trained MoE evaluated from its workdir and
exported to Hugging Face Mixtral. The last lines say where everything is.
"""
import os
import shutil

from absl import app, flags

from configs import evaluate as eval_config
from configs import train as train_config
from configs import upcycle as upcycle_config
from experiments import cli
from moe_jax import runs
from moe_jax.convert import export_hf

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes its outputs.")
_WINDOWS = flags.DEFINE_integer("max_windows", 4, "Eval windows of 512 tokens (0 = all 220).")
_STEPS = flags.DEFINE_integer("train_steps", 6, "Steps of each continued-training run.")
_EXPERTS = flags.DEFINE_integer("train_experts", 4, "Experts of the trained MoE (top-2).")


def _eval(checkpoint: str, workdir: str, max_windows: int, prompt: str = "") -> dict:
  config = eval_config.get_config()
  config.update(checkpoint=checkpoint, max_windows=max_windows, prompt=prompt)
  return runs.evaluate(config, workdir)


def demo(workdir: str, max_windows: int = 4, train_steps: int = 6, experts: int = 4) -> dict:
  workdir = os.path.abspath(workdir)
  print("== 1/5 dense SmolLM2-135M-Instruct (embedded GGUF) on pydoc_data.topics")
  dense = _eval("", os.path.join(workdir, "dense_eval"), max_windows,
                "The three most useful Python built-in functions are")
  print("== 2/5 upcycle: copy into 8 experts, top-2, every layer (streamed to disk)")
  config = upcycle_config.get_config("method=copy,experts=8,topk=2")
  config.eval_windows, config.overwrite = 0, True  # evaluated below, on step 1's windows
  up_dir = os.path.join(workdir, "moe_8x_top2")
  runs.upcycle(config, up_dir)
  up = _eval(up_dir, os.path.join(up_dir, "eval"), max_windows)
  print(f"== 3/5 continued training, {train_steps} steps on the same stdlib tokens: MoE "
        f"({experts} experts top-2 in every layer, upcycled on the fly) vs dense")
  runs_dirs = {name: os.path.join(workdir, f"train_{name}") for name in ("moe", "dense")}
  for name, arg in (("moe", f"method=copy,experts={experts}"), ("dense", "method=none")):
    config = train_config.get_config(f"runlocal,{arg},steps={train_steps}")
    config.layers = "all"  # Mixtral (step 5) has no dense layers
    config.loop.eval_batches = 0  # evaluated in step 4, from the saved checkpoint
    shutil.rmtree(runs_dirs[name], ignore_errors=True)
    runs.train(config, runs_dirs[name])
  print("== 4/5 evaluate both trained runs from their workdirs")
  trained = {n: _eval(d, os.path.join(d, "eval"), max_windows) for n, d in runs_dirs.items()}
  print("== 5/5 export the trained MoE to Hugging Face Mixtral")
  hf_dir = export_hf.export(runs_dirs["moe"], os.path.join(workdir, "train_moe_mixtral"),
                            "mixtral", overwrite=True)
  print(f"dense_ppl={dense['ppl']:.4f} upcycled_ppl={up['ppl']:.4f} "
        f"trained: moe_ppl={trained['moe']['ppl']:.4f} dense_ppl={trained['dense']['ppl']:.4f}")
  print(f"artefacts:\n  upcycled checkpoint  {up_dir}\n"
        f"  trained MoE run      {runs_dirs['moe']}\n  trained dense run    {runs_dirs['dense']}\n"
        f"  HF Mixtral export    {hf_dir}")
  print("next: python -m experiments.train --config=configs/train.py:runlocal "
        f"--config.init={runs_dirs['moe']} --workdir={workdir}/train_moe_more")
  return {"dense": dense, "upcycle": up, "train": trained, "export": hf_dir}


def main(argv):
  del argv
  cli.main_guard(demo, _WORKDIR.value, _WINDOWS.value, _STEPS.value, _EXPERTS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
