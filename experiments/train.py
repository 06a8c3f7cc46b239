"""Train (continue training) a model. See configs/train.py."""
from absl import app, flags
from ml_collections import config_flags

from moe_jax import runs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results.",
                               required=True)


def main(argv):
  del argv
  runs.main_guard(runs.train, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=runs.parse_flags)
