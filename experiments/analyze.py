"""What the experts learned: analysis.json, figures and report.md. See configs/analyze.py."""
from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from moe_jax import runs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/analyze.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the report is written.", required=True)


def main(argv):
  del argv
  cli.map_large_host_arrays()  # the static pass streams one layer at a time
  cli.main_guard(runs.analyze, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
