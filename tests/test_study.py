"""The study driver (moe_jax/study.py) and its report (study_report.py): seeded runs,
paired differences with standard errors and their verdicts, the results page, and a
miniature of every configs/study module (CI keeps each finding runnable)."""
import csv
import dataclasses
import glob
import math
import os

import numpy as np
import pytest

from moe_jax import config_util, runs, study, study_report, sweep

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
  merged = study.seeded_runs([{"name": "m", "init": "run:../seed,run:c,/abs/ckpt"}, *arms[::-1]],
                             shared, 1)
  assert merged[1]["init"] == "run:../seed,run:c/s0,/abs/ckpt"  # a merge of several runs
  order = [r["name"] for r in sweep.order(merged)]
  assert order.index("m/s0") > max(order.index("../seed"), order.index("c/s0"))
  assert order.index("b/s0") > order.index("a/s0")
  assert sweep.resolve(merged[1], "/w")["init"] == "/w/../seed,/w/c/s0,/abs/ckpt"
  with pytest.raises(ValueError, match="init=run:x names no run"):
    sweep.order([{"name": "m", "init": "run:../seed,run:x"}, *shared])
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
  finding = study.Finding.load(path, "runlocal")
  assert finding.number > 0 and finding.question and finding.claim
  trained = []

  def train(config, workdir):
    trained.append(workdir)
    return runs.train(config, workdir)

  workdir = str(study_root / finding.name)
  base = config_util.load_module(path).get_config("runlocal")
  go = lambda: study.run_study(base, finding.arms, finding.shared, 1, workdir, train)
  rows = go()
  arms = [a["name"] for a in finding.arms]
  assert [r["arm"] for r in rows] == arms and all(r["eval_loss"] > 0 for r in rows)
  assert all(r["tokens_per_s"] > 0 and r["train_s"] > 0 for r in rows)
  assert all(r["eval_loss_python"] > 0 and r["eval_loss_english"] > 0 for r in rows)
  shared = study.shared_rows(finding.shared, workdir)
  out_dir = str(study_root / "results" / finding.name)
  plots = study_report.write_results(rows, finding, workdir, out_dir, shared)
  assert [os.path.basename(p) for p in plots[:2]] == ["loss_vs_tokens.png",
                                                     "loss_vs_train_flops.png"]
  assert len(plots) == 2 + bool(finding.axis) and all(os.path.getsize(p) for p in plots)
  back = study_report.read_csv(os.path.join(out_dir, "results.csv"))
  assert [r["arm"] for r in back] == arms
  assert back[0]["eval_loss"] == pytest.approx(rows[0]["eval_loss"])
  md = open(os.path.join(out_dir, "results.md")).read()
  assert all(f"| {a} - {b} | 1 |" in md for a, b in finding.comparisons)
  n = len(trained)
  assert go() == rows and len(trained) == n  # finished runs are skipped
  page = study_report.render_page([finding], str(study_root / "results"), str(study_root))
  assert f"## {finding.number}. {finding.title}" in page and "one seed: no standard error" in page
  assert "a fixed sample of batches" in page  # the miniatures score loop.final_eval=batches
  assert ("| shared run |" in page) == (len(shared) > 1)  # e.g. finding 8's domain branches


def test_upcycled_experts_are_compared_with_the_seed(study_root):
  """expert_cosine reads the seed back from the provenance: a copy upcycle after two steps
  at a small LR is still close to 1, a dense run and a scratch MoE have none (NaN)."""
  path = os.path.join(ROOT, "configs", "study", "upcycling.py")
  finding = study.Finding.load(path, "runlocal")  # its miniature's runs, trained if missing
  rows = {r["arm"]: r for r in study.run_study(
      config_util.load_module(path).get_config("runlocal"), finding.arms, finding.shared, 1,
      str(study_root / finding.name), runs.train)}
  assert 0.9 < rows["upcycled"]["expert_cosine"] <= 1.0
  assert np.isnan(rows["dense"]["expert_cosine"]) and np.isnan(rows["scratch_moe"]["expert_cosine"])
  assert rows["upcycled"]["params"] > rows["dense"]["params"]
  assert rows["upcycled"]["active_params"] < rows["upcycled"]["params"]


def _rows(values):
  return [{"arm": arm, "seed": s, "eval_loss": v, "expert_cosine": c}
          for arm, vs, c in values for s, v in enumerate(vs)]


def test_verdicts_name_noise_reproduction_and_the_opposite():
  rows = _rows([("a", [3.0, 3.1, 3.2], 0.9), ("b", [3.5, 3.6, 3.7], 0.8),
                ("c", [3.1, 3.0, 3.3], 0.9)])
  d = study.paired_difference(rows, "a", "b")   # -0.5 every seed: se 0
  assert study_report.verdict(d, "lower").endswith(": reproduces")
  assert study_report.verdict(d, "higher").endswith(": the opposite of the claim")
  assert "lower than b" in study_report.verdict(d)
  noisy = study.paired_difference(rows, "a", "c")  # -0.1, +0.1, -0.1: within 2 SE
  assert study_report.verdict(noisy, "lower").startswith("within noise")
  one = study.paired_difference(rows[:1] + rows[3:4], "a", "b")
  assert study_report.verdict(one) == "one seed: no standard error, no verdict"
  table = study_report.comparison_table(rows, [("a", "b")], {("a", "b"): "lower"})
  assert table[-1] == "| a - b | 3 | -0.5000 ± 0 | a lower | a is lower than b by inf SE: reproduces |"


def test_trends_find_the_best_arm_and_rank_correlations():
  rows = _rows([("lr1", [3.3, 3.4], 0.99), ("lr2", [3.1, 3.2], 0.95), ("lr3", [3.2, 3.3], 0.90)])
  values = {"lr1": 1e-4, "lr2": 1e-3, "lr3": 1e-2}
  out = study_report.trends(rows, values, "lr")
  assert out[0].startswith("lowest mean held-out loss: lr2 (lr = 0.001, 3.1500 ± 0.0707)")
  assert out[1].endswith("Spearman rank correlation -0.50 over the 3 arm means")
  assert out[2].startswith("expert cosine to the seed against lr: Spearman rank correlation -1.00")
  for r, tps in zip(rows, (900, 1100, 2000, 2000, 1500, 1500)):
    r["tokens_per_s"] = tps
  out = study_report.trends(rows, values, "lr")
  assert out[1] == ("training throughput, fastest arm against slowest of 3: lr2 2000 tokens/s, "
                    "2.00x lr1: lr2 is higher than lr1 by 10.0 SE")
  for r, tps in zip(rows, (1000, 1010, 1030, 990, 1000, 1000)):
    r["tokens_per_s"] = tps  # lr2 - lr3 per seed: +30, -10, so 10 ± 20
  out = study_report.trends(rows, values, "lr")
  assert out[1].endswith("lr2 1010 tokens/s, 1.01x lr3: within noise (|difference| <= 2.43 SE)")


def test_the_extremes_of_more_arms_need_more_standard_errors():
  assert study_report.extremes_noise_se(2) == pytest.approx(study_report.NOISE_SE)
  # 3 pairs: each pair's two-sided tail is a third of 2 SE's (scipy.stats.norm).
  tail = 2 * (1 - 0.5 * (1 + math.erf(study_report.extremes_noise_se(3) / math.sqrt(2))))
  assert tail == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(2 / math.sqrt(2)))) / 3)
  assert study_report.extremes_noise_se(6) > study_report.extremes_noise_se(3)


def _stub_module(tmp_path, head: str) -> str:
  """bad.py: a study config module of one arm 'a' and no shared runs, after `head`."""
  path = tmp_path / "bad.py"
  path.write_text(head + "SEEDS = 1\ndef arms(arg=None):\n  yield {'name': 'a'}\n"
                  "def shared(arg=None):\n  return ()\n")
  return str(path)


def test_expected_signs_must_name_a_comparison(tmp_path):
  path = _stub_module(tmp_path, "COMPARISONS = (('a', 'b'),)\nEXPECTED = {('b', 'a'): 'lower'}\n")
  with pytest.raises(ValueError, match=r"bad.py: EXPECTED\[\('b', 'a'\)\]='lower'"):
    study.Finding.load(path)


def test_the_results_page_lists_a_finding_not_run_with_its_command(tmp_path):
  finding = study.Finding.load(os.path.join(ROOT, "configs", "study", "routing.py"))
  page = study_report.render_page([finding], str(tmp_path), str(tmp_path))
  assert (f"**Not run yet** (2 arms x 3 seeds = 6 runs of 300 steps). Run: "
          f"`{finding.command} --results_dir={tmp_path}`.") in page
  assert "## The seed model" in page and "Not trained yet" in page


def test_a_finding_can_run_part_of_its_arms_and_report_the_rest_as_not_run():
  finding = study.Finding.load(os.path.join(ROOT, "configs", "study", "upcycling.py"), "runlocal")
  part = finding.only(["upcycled", "dense"])
  assert [a["name"] for a in part.arms] == ["upcycled", "dense"] and finding.only([]) is finding
  with pytest.raises(ValueError, match=r"--arms: \['nope'\] are not arms of upcycling"):
    finding.only(["nope"])
  rows = _rows([("upcycled", [3.0, 3.1], 0.9), ("dense", [3.2, 3.3], float("nan"))])
  table = study_report.comparison_table(rows, finding.comparisons, finding.expected)
  assert table[2].startswith("| upcycled - dense | 2 | -0.2000 ± ")
  assert table[3] == "| upcycled - scratch_moe | 0 | – | upcycled lower | not run yet |"


def test_findings_from_another_build_of_the_seed_are_named():
  row = lambda loss: {"arm": "seed", "loss": loss, "eval_loss": 3.1}
  tables = {"routing": [row(4.999444)], "upcycling": [row(5.000861), {"arm": "x", "loss": 1.0}]}
  assert study_report.rebuilt_seeds({"routing": tables["routing"]}, 4.999444) == []
  (line,) = study_report.rebuilt_seeds(tables, 4.999444)
  assert "upcycling: training loss 5.000861" in line and "routing" not in line


def test_the_compute_section_divides_side_by_side_runs_and_counts_a_shared_run_once(tmp_path):
  def finding(name, number, processes):
    return study.Finding(name=name, number=number, title=name, command="", question="",
                         claim="", arms=(), shared=(), comparisons=(), expected={}, axis=None,
                         seeds=1, steps=1, processes=processes)

  def write(name, train_s, seed_s):
    row = lambda arm, t: {"arm": arm, "seed": 0, "steps": 1, "tokens": 1, "params": 1,
                          "active_params": 1, "train_s": t}
    os.makedirs(tmp_path / name)
    study_report.write_csv(str(tmp_path / name / "results.csv"), [row("a", t) for t in train_s])
    study_report.write_csv(str(tmp_path / name / "shared.csv"), [row("seed", seed_s)])

  write("one", [600, 600], 1800)     # 20 min on both cores
  write("two", [1200, 1200], 2400)   # 40 min over 2 processes
  findings = [finding("two", 2, 2), finding("one", 1, 1), finding("unrun", 3, 1)]
  read = lambda name: {n: study_report.read_csv(str(tmp_path / n / name)) for n in ("one", "two")}
  results, tables = read("results.csv"), read("shared.csv")
  lines = study_report.compute_section(findings, results, tables)
  assert lines[-5:] == ["| 1. one | 20 | 1 | 20 |", "| 2. two | 40 | 2 | 20 |",
                        "| shared: seed | 40 | 1 | 40 |",
                        "| **all** | 100 | | **80** (1.3 h; 2.7 core-hours) |", ""]
  assert study_report.compute_section([finding("unrun", 3, 1)], results, tables) == []
  line = study_report.compute_line(study_report.read_csv(str(tmp_path / "two" / "results.csv")),
                                   [], 2)
  assert line == "2 runs, 40 min of training, about 20 min of the machine's time with 2 side by side"


def test_a_finding_says_how_many_processes_shared_the_machine(tmp_path):
  path = _stub_module(tmp_path, "COMPARISONS = ()\nPROCESSES = 0\n")
  with pytest.raises(ValueError, match=r"bad.py: PROCESSES=0: expected a positive integer"):
    study.Finding.load(path)
  upcycling = study.Finding.load(os.path.join(ROOT, "configs", "study", "upcycling.py"))
  assert upcycling.processes == 2
  assert study_report.run_layout(upcycling) == (
      " The runs went 2 processes side by side, each pinned to one core (taskset -c 0 / -c 1), "
      "so their tokens/s and times are one core's.")
  ran = dataclasses.replace(upcycling, ran="on another path")
  assert study_report.run_layout(ran).endswith("one core's; on another path.")
  alone = dataclasses.replace(upcycling, processes=1)
  assert study_report.run_layout(alone) == ""
  assert study_report.run_layout(dataclasses.replace(ran, processes=1)) == (
      " The runs went on another path.")
