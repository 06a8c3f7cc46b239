"""The main job on the embedded defaults (`make demo`). See moe_jax.runs.demo."""
from absl import app, flags

from moe_jax import runs

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes its outputs.")
_WINDOWS = flags.DEFINE_integer("max_windows", 8, "Eval windows of 512 tokens (0 = all 220).")
_STEPS = flags.DEFINE_integer("train_steps", 16, "Steps of each continued-training run.")


def main(argv):
  del argv
  runs.main_guard(runs.demo, _WORKDIR.value, _WINDOWS.value, _STEPS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=runs.parse_flags)
