"""Train (continue training) a model. See configs/train.py.

Multi-host: run the same command on every host with --coordinator=HOST:PORT
--num_processes=N --process_id=I (or MOE_JAX_* environment variables, or
--coordinator=auto on a Cloud TPU pod; moe_jax/launch.py assembles the pod command).
"""
from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from moe_jax import distributed, runs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator", None,
                                   "host:port of process 0, or 'auto' (Cloud TPU, SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  cli.main_guard(distributed.initialize, _COORDINATOR.value, _NUM_PROCESSES.value,
                  _PROCESS_ID.value)
  cli.main_guard(runs.train, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
