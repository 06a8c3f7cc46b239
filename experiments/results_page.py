"""Write docs/results.md, the reproduction study's page, from the committed results.

  python -m experiments.results_page

Every number on the page is computed from the CSVs under --root (written by
experiments.study --results_dir); the question and the paper's claim come from each
configs/study module. A finding without results is listed with its command.
"""
import glob
import os

from absl import app, flags

from experiments import cli
from moe_jax import checkpoint, config_util, study, study_report

_ROOT = flags.DEFINE_string("root", "docs/results/study", "The study's committed results.")
_CONFIGS = flags.DEFINE_string("configs", "configs/study", "The study's config modules.")
_OUT = flags.DEFINE_string("out", "docs/results.md", "The page to write.")


def findings(config_dir: str) -> list[study.Finding]:
  """Every module of config_dir that defines arms (common.py and seed.py do not)."""
  paths = sorted(glob.glob(os.path.join(config_dir, "*.py")))
  return [study.Finding.load(p) for p in paths if hasattr(config_util.load_module(p), "arms")]


def run(root: str, config_dir: str, out: str) -> None:
  page = study_report.render_page(findings(config_dir), root, os.path.dirname(out) or ".")
  checkpoint.write_text_atomic(out, page + "\n")
  print(f"wrote {out}")


def main(argv):
  del argv
  cli.main_guard(run, _ROOT.value, _CONFIGS.value, _OUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
