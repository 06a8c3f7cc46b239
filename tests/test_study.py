"""The study driver (moe_jax/study.py): seeded runs, paired differences with standard
errors, and a miniature of every configs/study module (CI keeps each finding runnable)."""
import csv
import glob
import os

import numpy as np
import pytest

from moe_jax import config_util, runs, study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "study", "*.py"))
                 if hasattr(config_util.load_module(p), "arms"))


def test_seeded_runs_share_batches_per_seed_and_chain_within_a_seed():
  shared = [{"name": "../seed", "init": "scratch"}]
  arms = [{"name": "a", "init": "run:../seed"}, {"name": "b", "init": "run:a"},
          {"name": "c", "init": "scratch"}]
  out = study.seeded_runs(arms, shared, 2)
  assert [r["name"] for r in out] == ["../seed", "a/s0", "a/s1", "b/s0", "b/s1", "c/s0", "c/s1"]
  assert [r.get("loop.seed") for r in out] == [None, 0, 1, 0, 1, 0, 1]
  assert [r["init"] for r in out[1:5]] == ["run:../seed"] * 2 + ["run:a/s0", "run:a/s1"]
  with pytest.raises(ValueError, match="needs a 'name'"):
    study.seeded_runs([{"init": "scratch"}], [], 1)
  with pytest.raises(ValueError, match="loop.seed is set per seed"):
    study.seeded_runs([{"name": "a", "loop.seed": 3}], [], 1)


def test_paired_difference_is_the_mean_and_standard_error_over_common_seeds():
  rng = np.random.default_rng(0)
  a, b = rng.normal(3.0, 0.1, 5), rng.normal(3.2, 0.1, 5)
  rows = ([{"arm": "a", "seed": s, "eval_loss": v} for s, v in enumerate(a)]
          + [{"arm": "b", "seed": s, "eval_loss": v} for s, v in enumerate(b[:4])])
  d = study.paired_difference(rows, "a", "b")
  diff = a[:4] - b[:4]  # seed 4 ran only arm a
  assert d["n"] == 4
  assert d["diff"] == pytest.approx(diff.mean())
  assert d["se"] == pytest.approx(np.sqrt(np.sum((diff - diff.mean()) ** 2) / 3) / 2)
  assert study.mean_std([2.0]) == (2.0, 0.0)
  with pytest.raises(ValueError, match="no seed ran both"):
    study.paired_difference(rows, "a", "missing")


@pytest.fixture(scope="module")
def study_root(tmp_path_factory):
  """One study root for every miniature: the seed (`<root>/seed`) is trained once."""
  return tmp_path_factory.mktemp("study")


@pytest.mark.parametrize("path", STUDIES, ids=[os.path.basename(p) for p in STUDIES])
def test_every_study_config_runs_its_miniature_and_resumes(path, study_root):
  mod = config_util.load_module(path)
  trained = []

  def train(config, workdir):
    trained.append(workdir)
    return runs.train(config, workdir)

  workdir = str(study_root / os.path.basename(path)[:-3])
  go = lambda: study.run_study(mod.get_config("runlocal"), mod.arms("runlocal"),
                               mod.shared("runlocal"), 1, workdir, train)
  rows = go()
  arms = [a["name"] for a in mod.arms("runlocal")]
  assert [r["arm"] for r in rows] == arms and all(r["eval_loss"] > 0 for r in rows)
  plots = study.write_results(rows, mod.COMPARISONS, workdir, "mini")
  assert [os.path.basename(p) for p in plots] == ["loss_vs_tokens.png", "loss_vs_train_flops.png"]
  with open(os.path.join(workdir, "results.csv")) as f:
    assert len(list(csv.DictReader(f))) == len(arms)
  md = open(os.path.join(workdir, "results.md")).read()
  assert all(f"| {a} - {b} | 1 |" in md for a, b in mod.COMPARISONS)
  n = len(trained)
  assert go() == rows and len(trained) == n  # finished runs are skipped
