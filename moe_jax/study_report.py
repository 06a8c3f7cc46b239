"""The study's results, from its rows (study.py): results.csv and results.md per finding,
the plots, and docs/results.md, the page that collects every finding.

Everything a page says about our runs is computed here from the committed CSVs: the
tables (mean ± std over seeds), the paired differences with their standard errors, the
verdict on each comparison (a difference within 2 standard errors is called noise), and
the compute the runs took. Only the question and the paper's claim are the modules' words.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from moe_jax import metrics, plotting, study

NOISE_SE = 2.0   # a difference within this many standard errors is not called a result
_FLOATS = ("train_flops", "eval_loss", "eval_tokens", "loss", "tokens_per_s", "train_s", "expert_cosine",
           *(f"eval_loss_{d}" for d in study.DOMAINS))
_INTS = ("seed", "steps", "tokens", "params", "active_params")


def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, study.COLUMNS)
    w.writeheader()
    w.writerows(rows)


def read_csv(path: str) -> list[dict[str, Any]]:
  """Rows written by write_csv, with their numbers parsed back (NaN where empty)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in _FLOATS:  # a column an older file lacks reads as NaN
      r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
    for k in _INTS:
      r[k] = int(r[k])
  return rows


def by_arm(rows: list[dict]) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {}
  for r in rows:
    out.setdefault(r["arm"], []).append(r)
  return out


def _num(value: float, fmt: str) -> str:
  return "–" if math.isnan(value) else f"{value:{fmt}}"


def _pm(values: list[float], fmt: str) -> str:
  if all(math.isnan(v) for v in values):
    return "–"
  m, s = study.mean_std(values)
  return f"{m:{fmt}} ± {s:{fmt}}"


def arm_table(rows: list[dict]) -> list[str]:
  """Markdown: one line per arm, mean ± std over its seeds."""
  domains = [d for d in study.DOMAINS
             if any(math.isfinite(r.get(f"eval_loss_{d}", math.nan)) for r in rows)]
  lines = ["| arm | seeds | held-out loss | " + "".join(f"{d} | " for d in domains)
           + "training loss | expert cosine to seed | params (active) | tokens | "
           "training FLOPs | tokens/s |", "|---" * (9 + len(domains)) + "|"]
  for arm, mine in by_arm(rows).items():
    col = lambda k: [r[k] for r in mine]
    first = mine[0]
    lines.append(f"| {arm} | {len(mine)} | {_pm(col('eval_loss'), '.4f')} | "
                 + "".join(f"{_pm(col(f'eval_loss_{d}'), '.4f')} | " for d in domains) +
                 f"{_pm(col('loss'), '.4f')} | {_pm(col('expert_cosine'), '.3f')} | "
                 f"{first['params'] / 1e6:.2f}M ({first['active_params'] / 1e6:.2f}M) | "
                 f"{first['tokens']:.3g} | {first['train_flops']:.3g} | "
                 f"{_pm(col('tokens_per_s'), '.0f')} |")
  return lines


def shared_table(shared: list[dict]) -> list[str]:
  """Markdown: the runs every seed starts from (a seed, domain branches), one line each
  with its held-out loss per domain; [] when there is only the seed."""
  if len(shared) < 2:
    return []
  lines = ["| shared run | held-out loss | " + " | ".join(study.DOMAINS) + " | tokens | "
           "minutes |", "|---" * (4 + len(study.DOMAINS)) + "|"]
  for r in shared:
    domains = " | ".join(_num(r.get(f"eval_loss_{d}", math.nan), ".4f") for d in study.DOMAINS)
    lines.append(f"| {r['arm']} | {r['eval_loss']:.4f} | {domains} | {r['tokens']:.3g} | "
                 f"{r['train_s'] / 60:.0f} |")
  return lines + [""]


def extremes_noise_se(num_arms: int) -> float:
  """The SE multiple that makes the largest of num_arms arms against the smallest as
  unlikely a false result as NOISE_SE makes one planned comparison: NOISE_SE's two-sided
  normal tail shared over the n(n-1)/2 pairs the extremes were picked from (Bonferroni)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  pairs = max(1, num_arms * (num_arms - 1) // 2)
  return float(stats.norm.isf(stats.norm.sf(NOISE_SE) / pairs))


def verdict(d: dict, expected: str | None = None, noise_se: float = NOISE_SE) -> str:
  """What a paired difference (of held-out loss, or any per-seed figure) says, against the
  paper's sign if given; within noise_se standard errors it is noise."""
  if d["n"] < 2 or not math.isfinite(d["se"]):
    return "one seed: no standard error, no verdict"
  if abs(d["diff"]) <= noise_se * d["se"]:
    said = f"within noise (|difference| <= {noise_se:.3g} SE)"
    return said + (": the claim is not shown here" if expected else "")
  got = "lower" if d["diff"] < 0 else "higher"
  ratio = abs(d["diff"]) / d["se"] if d["se"] else math.inf
  said = f"{d['a']} is {got} than {d['b']} by {ratio:.1f} SE"
  if expected:
    said += ": reproduces" if got == expected else ": the opposite of the claim"
  return said


def differences(rows: list[dict], comparisons: Iterable[tuple[str, str]]):
  """(a, b, paired difference of held-out loss, or None where an arm has no rows)."""
  ran = {r["arm"] for r in rows}
  for a, b in comparisons:
    yield a, b, study.paired_difference(rows, a, b) if {a, b} <= ran else None


def comparison_table(rows: list[dict], comparisons: Iterable[tuple[str, str]],
                     expected: dict[tuple[str, str], str] | None = None) -> list[str]:
  """Markdown: each comparison's mean paired difference ± SE, and its verdict."""
  expected = expected or {}
  lines = ["| comparison | seeds | held-out loss difference (mean ± SE) | claim | verdict |",
           "|---|---|---|---|---|"]
  for a, b, d in differences(rows, comparisons):
    claim = f"{a} {expected[(a, b)]}" if (a, b) in expected else "–"
    if d is None:
      lines.append(f"| {a} - {b} | 0 | – | {claim} | not run yet |")
    else:
      lines.append(f"| {a} - {b} | {d['n']} | {d['diff']:+.4f} ± {d['se']:.2g} | {claim} | "
                   f"{verdict(d, expected.get((a, b)))} |")
  return lines


def trends(rows: list[dict], values: dict[str, Any], label: str) -> list[str]:
  """Sentences on the arms' means against a varied value: the best arm, the fastest to
  train against the slowest (where throughput was logged, with whether the two differ
  beyond noise, allowing for their being the extremes: extremes_noise_se), and (for a
  numeric value) the Spearman rank correlation of each metric with it."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  arms = by_arm(rows)
  names = [a for a in values if a in arms]
  means = {k: {a: study.mean_std([r[k] for r in arms[a]])[0] for a in names}
           for k in ("eval_loss", "expert_cosine")}
  best = min(names, key=means["eval_loss"].get)
  out = [f"lowest mean held-out loss: {best} ({label} = {values[best]}, "
         f"{_pm([r['eval_loss'] for r in arms[best]], '.4f')})"]
  speed = {a: study.mean_std([r.get("tokens_per_s", math.nan) for r in arms[a]])[0]
           for a in names}
  if len(names) > 1 and all(math.isfinite(v) for v in speed.values()):
    fast, slow = max(names, key=speed.get), min(names, key=speed.get)
    d = study.paired_difference(rows, fast, slow, key="tokens_per_s")
    out.append(f"training throughput, fastest arm against slowest of {len(names)}: {fast} "
               f"{speed[fast]:.0f} tokens/s, {speed[fast] / speed[slow]:.2f}x {slow}: "
               f"{verdict(d, noise_se=extremes_noise_se(len(names)))}")
  numeric = all(isinstance(values[a], (int, float)) for a in names)
  for key, what in (("eval_loss", "held-out loss"), ("expert_cosine", "expert cosine to the seed")):
    ys = [means[key][a] for a in names]
    if numeric and len(names) > 2 and all(math.isfinite(y) for y in ys):
      rho = stats.spearmanr([values[a] for a in names], ys).statistic
      out.append(f"{what} against {label}: Spearman rank correlation {rho:+.2f} over the "
                 f"{len(names)} arm means")
  return out


def compute_line(rows: list[dict], shared: list[dict], processes: int = 1) -> str:
  """The training compute the finding's runs took (evaluation and start-up excluded); with
  several processes side by side, also the machine's time that is (their sum / processes)."""
  own = sum(r["train_s"] for r in rows) / 60
  line = f"{len(rows)} runs, {own:.0f} min of training"
  if processes > 1:
    line += f", about {own / processes:.0f} min of the machine's time with {processes} side by side"
  if shared:
    line += " (and the shared " + ", ".join(
        f"{r['arm']}, {r['train_s'] / 60:.0f} min for {r['tokens']:.3g} tokens" for r in shared) + ")"
  return line


def run_layout(finding: study.Finding) -> str:
  """A sentence on how the finding's runs went (its PROCESSES, then its RAN), or ''."""
  parts = [finding.ran] if finding.ran else []
  if finding.processes > 1:
    cores = " / ".join(f"-c {i}" for i in range(finding.processes))
    parts.insert(0, f"{finding.processes} processes side by side, each pinned to one core "
                    f"(taskset {cores}), so their tokens/s and times are one core's")
  return f" The runs went {'; '.join(parts)}." if parts else ""


def compute_section(findings: list[study.Finding], results: dict[str, list[dict]],
                    tables: dict[str, list[dict]]) -> list[str]:
  """Markdown: each finding's training time on the machine (its runs' sum over the processes
  that shared it; `results`, each run finding's results.csv rows), the shared runs once each
  (the longest build any finding recorded, from `tables`, each finding's shared.csv rows),
  and the total; [] before any finding has results."""
  rows, shared = [], {}
  for f in sorted(findings, key=lambda f: f.number):
    if f.name not in results:
      continue
    own = sum(r["train_s"] for r in results[f.name]) / 60
    rows.append((f"{f.number}. {f.name}", own, f.processes))
    for r in tables.get(f.name, []):
      shared[r["arm"]] = max(shared.get(r["arm"], 0.0), r["train_s"] / 60)
  if not rows:
    return []
  rows += [(f"shared: {name}", m, 1) for name, m in shared.items()]
  machine = sum(m / p for _, m, p in rows)
  lines = ["## Compute", "",
           "The training time of every finding and of the shared runs it starts from, each "
           "shared run counted once (its longest recorded build). With several processes side "
           "by side, the machine's time is their sum divided by their number. Each run had "
           "both cores or one of them to itself, so core-hours are twice the machine's hours.", "",
           "| | training minutes (sum over runs) | processes side by side | minutes of the machine |",
           "|---|---|---|---|"]
  lines += [f"| {name} | {m:.0f} | {p} | {m / p:.0f} |" for name, m, p in rows]
  lines += [f"| **all** | {sum(m for _, m, _ in rows):.0f} | | **{machine:.0f}** "
            f"({machine / 60:.1f} h; {2 * machine / 60:.1f} core-hours) |", ""]
  return lines


def write_results(rows: list[dict], finding: study.Finding, workdir: str, out_dir: str,
                  shared: list[dict] = ()) -> list[str]:
  """results.csv, shared.csv (the shared runs' rows), results.md and the plots of one
  finding (its runs below `workdir`) into `out_dir`; returns the plots' paths."""
  os.makedirs(out_dir, exist_ok=True)
  write_csv(os.path.join(out_dir, "results.csv"), rows)
  write_csv(os.path.join(out_dir, "shared.csv"), list(shared))
  lines = [f"# {finding.name}", "", *arm_table(rows), "",
           *comparison_table(rows, finding.comparisons, finding.expected), "",
           f"Compute: {compute_line(rows, list(shared), finding.processes)}."]
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plots = plot_curves(rows, workdir, out_dir, finding.name)
  if finding.axis:
    plots.append(plot_against(rows, finding.axis_values(), finding.axis[1], out_dir,
                              finding.name))
  return plots


def _mean_curve(run_dirs: list[str]) -> tuple[np.ndarray, ...]:
  """(steps, mean, min, max) of the held-out loss over the runs, at the steps all logged."""
  curves = [metrics.curve(metrics.read(d), "eval_loss") for d in run_dirs]
  steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
  ys = np.array([[dict(zip(s.tolist(), v))[t] for t in steps] for s, v in curves])
  return np.asarray(steps), ys.mean(0), ys.min(0), ys.max(0)


# Each arm its own dashes and marker besides its colour: arms that train alike (capacity
# factors that drop nothing) draw the same curve, and each stays visible over the others.
_STYLES = [{"linestyle": ls, "marker": m, "markerfacecolor": face} for ls, m, face in (
    ("-", "o", None), ("--", "s", "none"), (":", "^", "none"), ("-.", "D", "none"),
    ((0, (5, 1, 1, 1, 1, 1)), "v", "none"), ((0, (1, 3)), "P", "none"))]


def _seeds(n: int) -> str:
  return f"{n} seed" + ("s" if n != 1 else "")


def plot_curves(rows: list[dict], workdir: str, out_dir: str, title: str,
                zoom: float = 1.1) -> list[str]:
  """Held-out loss against training tokens and against training FLOPs, one curve per arm
  (mean over its seeds, each arm its own colour, dashes and marker) with a band from the
  lowest to the highest seed; the curves are read from the runs below `workdir`. When an
  arm ends above `zoom` times the best arm's loss, a second panel shows only the arms
  below it, on their own scale."""
  arms = by_arm(rows)
  curves = {arm: _mean_curve([os.path.join(workdir, study.run_name(arm, r["seed"]))
                              for r in mine]) for arm, mine in arms.items()}
  best = min(c[1][-1] for c in curves.values())
  close = [a for a, c in curves.items() if c[1][-1] <= zoom * best]
  panels = [list(curves)] + ([close] if len(close) < len(curves) else [])
  paths = []
  for key, label in (("tokens", "training tokens"), ("train_flops", "training FLOPs")):
    fig, axes = plotting.subplots(1, len(panels), figsize=(7 * len(panels), 4.2),
                                  layout="constrained", squeeze=False)
    for ax, shown in zip(axes[0], panels):
      for i, arm in enumerate(curves):
        if arm not in shown:
          continue
        steps, mean, lo, hi = curves[arm]
        first = arms[arm][0]
        x = steps * (first[key] / first["steps"])  # the same per step for every seed
        ax.plot(x, mean, ms=4, color=f"C{i}", label=f"{arm} ({_seeds(len(arms[arm]))})",
                **_STYLES[i % len(_STYLES)])
        ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2)
      ax.set(xlabel=label, ylabel="held-out loss",
             title=title if len(shown) == len(curves) else f"{title}: the arms within "
             f"{zoom - 1:.0%} of the best")
      ax.legend(fontsize=8)
    paths.append(os.path.join(out_dir, f"loss_vs_{key}.png"))
    fig.savefig(paths[-1], dpi=110)
  return paths


def plot_against(rows: list[dict], values: dict[str, Any], label: str, out_dir: str,
                 title: str) -> str:
  """The final held-out loss (and the experts' cosine to the seed, where any arm has
  one) against the arms' varied value: mean with a ±std bar and each seed's point.
  Numeric values share a (log, if they span 10x) axis; others are evenly spaced."""
  arms = by_arm(rows)
  names = [a for a in values if a in arms]
  numeric = all(isinstance(values[a], (int, float)) and not isinstance(values[a], bool)
                for a in names)
  x = {a: float(values[a]) if numeric else i for i, a in enumerate(names)}
  keys = [("eval_loss", "final held-out loss")]
  if any(math.isfinite(r["expert_cosine"]) for r in rows):
    keys.append(("expert_cosine", "expert cosine to the seed"))
  fig, axes = plotting.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8),
                                layout="constrained", squeeze=False)
  for ax, (key, ylabel) in zip(axes[0], keys):
    for a in names:
      ys = [r[key] for r in arms[a] if math.isfinite(r[key])]
      if not ys:
        continue
      m, s = study.mean_std(ys)
      ax.errorbar([x[a]], [m], yerr=[s], fmt="o", color="C0", capsize=4)
      ax.plot([x[a]] * len(ys), ys, ".", color="C1", alpha=0.6)
    xs = [x[a] for a in names]
    if numeric and max(xs) > 10 * min(xs) > 0:
      ax.set_xscale("log")
    ax.set_xticks(xs, [str(values[a]) for a in names])
    ax.minorticks_off()
    ax.set(xlabel=label, ylabel=ylabel)
  fig.suptitle(title)
  path = os.path.join(out_dir, "against_" + label.replace(" ", "_") + ".png")
  fig.savefig(path, dpi=110)
  return path


def write_curve(run_dir: str, out_dir: str, name: str) -> list[str]:
  """One run's loss curve as results to commit (the checkpoints are not): <name>.csv
  (step, tokens, training and held-out loss) and <name>.png."""
  rows = metrics.read(run_dir)
  tokens_per_step = study.run_row(run_dir, name, 0)["tokens"] / max(r["step"] for r in rows)
  os.makedirs(out_dir, exist_ok=True)
  csv_path, png_path = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("csv", "png"))
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step", "tokens", "loss", "eval_loss"])
    for r in rows:
      w.writerow([r["step"], int(r["step"] * tokens_per_step), r.get("loss"), r.get("eval_loss")])
  fig, ax = plotting.subplots(figsize=(7, 4.2), layout="constrained")
  for key, style in (("loss", "-"), ("eval_loss", "o-")):
    steps, values = metrics.curve(rows, key)
    ax.plot(steps * tokens_per_step, values, style, ms=3, label=key.replace("_", " "))
  ax.set(xlabel="training tokens", ylabel="loss", title=name)
  ax.legend()
  fig.savefig(png_path, dpi=110)
  return [csv_path, png_path]


def _link(path: str, page_dir: str) -> str:
  return os.path.relpath(path, page_dir).replace(os.sep, "/")


def _seed_rows(tables: dict[str, list[dict]]) -> dict[str, dict]:
  """Each finding's row of the sequential seed (arm 'seed') in its shared.csv."""
  return {name: r for name, t in tables.items() for r in t if r["arm"] == "seed"}


def rebuilt_seeds(tables: dict[str, list[dict]], curve_loss: float) -> list[str]:
  """A sentence naming the findings whose seed is another build than seed.csv's (a
  rebuild on another CPU gives other floating-point results), or none."""
  other = {n: r for n, r in _seed_rows(tables).items()
           if not math.isclose(r["loss"], curve_loss, rel_tol=1e-9)}
  if not other:
    return []
  parts = "; ".join(f"{n}: training loss {r['loss']:.6f}, held-out {r['eval_loss']:.4f}"
                    for n, r in sorted(other.items()))
  return [f"The curve above is the build of the seed with final training loss "
          f"{curve_loss:.6f}. These findings ran from a rebuild of it by the same command on "
          f"another CPU, whose floating-point results differ ({parts}); every arm of a "
          f"finding starts from the same build."]


def seed_section(root: str, page_dir: str, tables: dict[str, list[dict]]) -> list[str]:
  """The shared seed model: its size, tokens, time and loss curve (seed.csv, seed.png), and
  which findings (their shared.csv, `tables` by finding name) started from another build."""
  curve = os.path.join(root, "seed.csv")
  if not os.path.exists(curve):
    return ["## The seed model", "", "Not trained yet: `python -m experiments.train "
            "--config=configs/study/seed.py --workdir=runs/study/seed`.", ""]
  with open(curve, newline="") as f:
    rows = list(csv.DictReader(f))
  points = [r for r in rows if r["eval_loss"]]
  curve_loss = float(rows[-1]["loss"])
  builds = [r for r in _seed_rows(tables).values()
            if math.isclose(r["loss"], curve_loss, rel_tol=1e-9)]
  shared = ([r for r in builds if r.get("final_eval") == "split"] or builds)[:1]
  lines = ["## The seed model", "",
           "Every finding starts from one dense model pre-trained here from scratch "
           "(configs/study/seed.py) on the standard library's Python and the English pydoc "
           f"topics. Its held-out loss on the fixed sample of the curve went from "
           f"{float(points[0]['eval_loss']):.3f} (step {points[0]['step']}) to "
           f"{float(points[-1]['eval_loss']):.3f} (step {points[-1]['step']}, "
           f"{int(points[-1]['tokens']):.3g} tokens)."]
  if shared:
    r = shared[0]
    if r.get("final_eval") == "split":
      domains = ", ".join(f"{d} {r[f'eval_loss_{d}']:.3f}" for d in study.DOMAINS
                          if math.isfinite(r.get(f"eval_loss_{d}", math.nan)))
      lines[-1] += (f" Over all {r['eval_tokens']:,.0f} scored tokens of the held-out split "
                    f"it scores {r['eval_loss']:.3f} ({domains}).")
    lines[-1] += (f" It has {r['params'] / 1e6:.2f}M parameters and trained for "
                  f"{r['train_s'] / 60:.0f} min ({r['tokens_per_s']:.0f} tokens/s).")
  rebuilt = rebuilt_seeds(tables, curve_loss)
  return lines + ["", f"![seed loss curve]({_link(os.path.join(root, 'seed.png'), page_dir)})",
                  "", *(rebuilt + [""] if rebuilt else [])]


def scored_on(rows: list[dict]) -> str:
  """What the table's held-out losses were scored on (loop.final_eval)."""
  tokens = sorted({r["eval_tokens"] for r in rows})
  if all(r.get("final_eval") == "split" for r in rows):
    count = " to ".join(f"{t:,.0f}" for t in dict.fromkeys([tokens[0], tokens[-1]]))
    return (f"held-out loss over all {count} scored tokens of the held-out split, each "
            "domain's over all of its own; the curves' points are a fixed sample of it")
  return "held-out losses over a fixed sample of batches of the held-out split"


def finding_section(finding: study.Finding, root: str, page_dir: str,
                    rows: list[dict] | None, shared: list[dict]) -> list[str]:
  """One finding's section: question, claim, our tables and figures (`rows`: its
  results.csv rows, None before it has run; `shared`: its shared.csv rows), the command
  and its compute, and what the comparisons say; or that it has not been run."""
  out_dir = os.path.join(root, finding.name)
  lines = [f"## {finding.number}. {finding.title}", "", f"**Question.** {finding.question}", "",
           f"**The paper's claim.** {finding.claim}", ""]
  command = f"{finding.command} --results_dir={root}"
  if rows is None:
    return lines + [f"**Not run yet** ({finding.plan()}). Run: `{command}`.", ""]
  seeds = min(len(v) for v in by_arm(rows).values())
  lines += [f"**Ours** ({seeds} seeds per arm; each arm's losses at its last step; "
            f"{scored_on(rows)}):", "",
            *arm_table(rows), "", *shared_table(shared),
            *comparison_table(rows, finding.comparisons, finding.expected), ""]
  for png in sorted(p for p in os.listdir(out_dir) if p.endswith(".png")):
    lines += [f"![{finding.name} {png[:-4]}]({_link(os.path.join(out_dir, png), page_dir)})", ""]
  ran = run_layout(finding)
  lines += [f"**Re-run:** `{command}` ({finding.plan()}). Compute: "
            f"{compute_line(rows, shared, finding.processes)}.{ran}", "", "**What it says.**", ""]
  arms = by_arm(rows)
  for a, b, d in differences(rows, finding.comparisons):
    if d is None:
      lines.append(f"- {a} - {b}: not run yet (its arms have no results).")
      continue
    rel = d["diff"] / study.mean_std([r["eval_loss"] for r in arms[b]])[0]
    lines.append(f"- {a} - {b} = {d['diff']:+.4f} ± {d['se']:.2g} (SE, {d['n']} seeds; "
                 f"{rel:+.1%} of {b}'s loss): {verdict(d, finding.expected.get((a, b)))}.")
  if finding.axis:
    lines += [f"- {t}." for t in trends(rows, finding.axis_values(), finding.axis[1])]
  return lines + [""]


def render_page(findings: list[study.Finding], root: str, page_dir: str) -> str:
  """docs/results.md: the seed, then every finding in order, from the CSVs below `root`."""
  def csvs(name):  # each finding's rows of `name`, for those that have the file
    paths = {f.name: os.path.join(root, f.name, name) for f in findings}
    return {f: read_csv(p) for f, p in paths.items() if os.path.exists(p)}

  results, tables = csvs("results.csv"), csvs("shared.csv")
  lines = ["# Results: the reproduction study", "",
           "Generated by `python -m experiments.results_page` from the CSVs in "
           f"`{root}`; do not edit by hand. Each finding compares its arms over several "
           "seeds: seed s gives every arm the same training batches, and every run is "
           "scored on the same held-out batches, so each comparison is the mean of its "
           "per-seed (paired) differences, with the standard error of that mean. A "
           f"difference within {NOISE_SE:g} standard errors is reported as noise, and a "
           "significant one with its size relative to the loss; the fastest arm against "
           "the slowest, picked from all pairs, needs more (the same tail shared over the "
           "pairs). Arms are compared at "
           "equal training tokens unless a finding says otherwise. Training times are of the 2-core CPU "
           "machine, evaluation excluded, one process on both cores unless a finding says "
           "otherwise.", "", *seed_section(root, page_dir, tables)]
  for f in sorted(findings, key=lambda f: f.number):
    lines += finding_section(f, root, page_dir, results.get(f.name), tables.get(f.name, []))
  return "\n".join(lines + compute_section(findings, results, tables))
