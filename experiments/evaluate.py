"""Perplexity of a checkpoint on a text, and a greedy completion. See configs/evaluate.py."""
from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from moe_jax import runs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/evaluate.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where eval.json is written.", required=True)


def main(argv):
  del argv
  cli.main_guard(runs.evaluate, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
