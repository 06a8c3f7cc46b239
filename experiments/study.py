"""Run one finding of the reproduction study, every arm over several seeds.

  python -m experiments.study --config=configs/study/upcycling.py --workdir=runs/study/upcycling \
      --results_dir=docs/results/study

The config module (configs/study/*.py) gives get_config(arg), shared(arg), arms(arg),
COMPARISONS and SEEDS (moe_jax/study.py). Finished runs are skipped. results.csv,
shared.csv, results.md and the plots go to `<results_dir>/<finding>/` (the workdir itself
without --results_dir), and the shared runs' loss curves beside that folder (seed.csv and
seed.png) as the runs lie beside the workdir. Then `python -m experiments.results_page`.

Several processes can share one finding, e.g. one per core on a CPU machine
(`taskset -c 0 python -m experiments.study ...` and `taskset -c 1 ...`, same flags): each
passes over the runs another is training and waits for them before writing the results.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from moe_jax import runs, study, study_report, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "A study config module.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The finding's directory.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 0, "Seeds per arm (0: the module's SEEDS).")
_ARMS = flags.DEFINE_list("arms", [], "Run and report only these arms ([]: all); a "
                          "comparison whose arms did not run is listed as not run.")
_RESULTS = flags.DEFINE_string("results_dir", "", "Where the study's results are committed "
                               "(docs/results/study); '' = the workdir.")


def run(config, workdir: str, seeds: int, results_dir: str, arms: list[str]) -> None:
  path, _, arg = flags.FLAGS["config"].config_filename.partition(":")
  finding = study.Finding.load(path, arg or None).only(arms)
  os.makedirs(workdir, exist_ok=True)
  rows = study.run_study(config, finding.arms, finding.shared, seeds or finding.seeds,
                         workdir, runs.train)
  shared = study.shared_rows(finding.shared, workdir)
  out_dir = os.path.join(results_dir, finding.name) if results_dir else workdir
  for p in study_report.write_results(rows, finding, workdir, out_dir, shared):
    print(f"plot: {p}")
  if results_dir:
    for run_ in finding.shared:
      name = sweep.run_name(run_)
      target = os.path.normpath(os.path.join(out_dir, name))
      for p in study_report.write_curve(os.path.normpath(os.path.join(workdir, name)),
                                        os.path.dirname(target), os.path.basename(target)):
        print(f"curve: {p}")
  print(open(os.path.join(out_dir, "results.md")).read())


def main(argv):
  del argv
  cli.main_guard(run, _CONFIG.value, _WORKDIR.value, _SEEDS.value, _RESULTS.value,
                  _ARMS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
