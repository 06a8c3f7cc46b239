"""Regenerates the tables of docs/benchmarks.md that come from docs/results/*.json.

  python -m experiments.render_results

Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`, and is
rendered from docs/results/NAME.json by RENDERERS[NAME], or for the benchmark binaries'
--out files by the renderer of NAME's prefix (PREFIXES: kernels_*, layer_*, train_*);
summary_*.json lists layer results to sum up as ranges over runs.
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
RESULTS = os.path.join(ROOT, "docs", "results")


def generate_smollm2(r: dict) -> str:
  rows = [
      "| model | new tokens | cached tok/s | uncached tok/s | speedup | same tokens |",
      "|---|---|---|---|---|---|",
      f"| SmolLM2-135M dense | {r['new_tokens']} | {r['cached_tokens_per_s']:.1f} | "
      f"{r['uncached_tokens_per_s']:.2f} | {r['speedup']:.1f}x | "
      f"{'yes' if r['dense_cached_equals_uncached'] else 'NO'} |"]
  if "check_tokens" in r:
    rows.append(f"| its upcycle ({r['upcycle']}) | {r['check_tokens']} | | | | "
                f"cached = uncached: {'yes' if r['moe_cached_equals_uncached'] else 'NO'}; "
                f"= dense: {'yes' if r['moe_equals_dense'] else 'NO'} |")
  return "\n".join([f"`{r['command']}` ({r['machine']}, {r['device']}, jax {r['jax']}, "
                    f"{r['date']}; prompt of {r['prompt_tokens']} tokens, greedy, "
                    f"median of {r['repeats']} after the warm-ups compile)", "", *rows])


def harness_smollm2(r: dict) -> str:
  rows = ["| model | acc (harness CLI) | acc_norm (CLI) | acc (experiments.evaluate) | "
          "acc_norm (evaluate) |", "|---|---|---|---|---|"]
  for name, m in r["models"].items():
    rows.append(f"| {name} | {m['cli_acc']:.4f} | {m['cli_acc_norm']:.4f} | "
                f"{m['evaluate_acc']:.4f} | {m['evaluate_acc_norm']:.4f} |")
  return "\n".join([
      f"`{r['command']}` ({r['machine']}, {r['device']}, jax {r['jax']}, {r['date']}; "
      f"task {r['task']}, {r['docs']} docs, {r['requests']} loglikelihood requests)", "", *rows,
      "", f"Accuracies equal: {'yes' if r['accuracies_equal'] else 'NO'}; largest per-request "
      f"log-likelihood difference, dense vs upcycled: {r['max_abs_loglik_diff_dense_vs_upcycled']:.2e}."])


def _source(r: dict) -> str:
  return f"`{r['command']}` ({r['machine']}, {r['device']}, jax {r['jax']}, {r['date']})"


def kernels(r: dict) -> str:
  """experiments.check_kernels --run --out: each check's relative error against its bound."""
  s = r["sizes"]
  rows = ["| dtype | seed | check | relative error | bound | |", "|---|---|---|---|---|---|"]
  for c in r["checks"]:
    err = f"{c['rel_err']:.2e}" if "rel_err" in c else c["error"]
    rows.append(f"| {c['dtype']} | {c['seed']} | {c['check']} | {err} | {c['bound']:.0e} | "
                f"{'ok' if c['ok'] else '**FAIL**'} |")
  return "\n".join([f"{_source(r)}; platform {r['platform']}; T={s['t']} d={s['d']} "
                    f"f={s['f']} E={s['e']} k={s['k']}", "", *rows])


def _fastest_peer(r: dict) -> dict[tuple, float]:
  """(E, f, k) -> seconds of the fastest transformers block implementation in a bench_moe
  result (its dense FFN left out)."""
  return {(x["E"], x["f"], x["k"]): min(v for n, v in x["seconds"].items() if n != "dense")
          for x in r.get("transformers", [])}


# bench_floor's block loops on equal groups (bench.strided_experts, random_equal_experts).
LOOPS = (("loop", "block loop, equal groups"),
         ("loop_random", "block loop, random equal groups"))


def layer(r: dict) -> str:
  """experiments.bench_moe --out: the layer against dense, and the grouped matmul."""
  peers = _fastest_peer(r)
  vs = lambda x: (f" {x['moe_s'] / peers[(x['E'], x['f'], x['k'])]:.3f} |"
                  if (x["E"], x["f"], x["k"]) in peers else " |")
  mem = all("moe_temp_bytes" in x for x in r["layer"])  # recorded since 2026-12-05
  mib = lambda x: (f" {x['moe_temp_bytes'] / 2**20:.0f} | {x['dense_temp_bytes'] / 2**20:.0f} |"
                   if mem else "")
  rows = ["| E | f | k | backend | MoE fwd+bwd s | dense fwd+bwd s | MoE / dense | MoE / "
          "fastest transformers block |" + (" MoE temp MiB | dense temp MiB |" if mem else ""),
          "|---|---|---|---|---|---|---|---|" + ("---|---|" if mem else "")]
  rows += [f"| {x['E']} | {x['f']} | {x['k']} | {x['backend']} | {x['moe_s']:.5f} | "
           f"{x['dense_s']:.5f} | {x['ratio']:.3f} |" + vs(x) + mib(x) for x in r["layer"]]
  split = [x for x in r["layer"] if "breakdown" in x]  # bench_moe --breakdown
  if split:
    rows += ["", "| E | f | k | backend | MoE products s | MoE rest s | dense products s | "
             "dense rest s | the MoE's rest by jax operation, s |", "|---" * 9 + "|"]
    rows += [f"| {x['E']} | {x['f']} | {x['k']} | {x['backend']} | " + " | ".join(
        f"{x['breakdown'][n][part]:.5f}" for n in ("moe", "dense")
        for part in ("products_s", "rest_s")) + " | " + ", ".join(
        f"{op} {v:.4f}" for op, v in sorted(x["breakdown"]["moe"]["rest_by_op"].items(),
                                             key=lambda item: -item[1])) + " |"
             for x in split]
  if r.get("transformers"):
    rows += ["", "| transformers block (torch) | E | f | k | implementation | fwd+bwd s | "
             "its dense s | block / its dense |", "|---|---|---|---|---|---|---|---|"]
    rows += [f"| torch {x['torch']}, {x['threads']} threads | {x['E']} | {x['f']} | {x['k']} | "
             f"{impl} | {x['seconds'][impl]:.5f} | {x['seconds']['dense']:.5f} | "
             f"{x['ratio'][impl]:.3f} |" for x in r["transformers"] for impl in x["ratio"]]
  if r.get("floor"):
    # Older files have no block loop column, or only the strided one (no loop_random).
    loops = [(n, label) for n, label in LOOPS if all(f"{n}_ratio" in x for x in r["floor"])]
    rows += ["", "| the experts alone, rows pre-grouped (E, f, k) | forward s | dense forward s | "
             "forward ratio | fwd+bwd s | dense fwd+bwd s | fwd+bwd ratio |" + "".join(
                 f" {label}, fwd+bwd s | its ratio |" for _, label in loops),
             "|---|---|---|---|---|---|---|" + "---|---|" * len(loops)]
    rows += [f"| {x['E']}, {x['f']}, {x['k']} | {x['seconds']['floor_fwd']:.5f} | "
             f"{x['seconds']['dense_fwd']:.5f} | {x['fwd_ratio']:.3f} | "
             f"{x['seconds']['floor']:.5f} | {x['seconds']['dense']:.5f} | {x['ratio']:.3f} |" +
             "".join(f" {x['seconds'][n]:.5f} | {x[f'{n}_ratio']:.3f} |" for n, _ in loops)
             for x in r["floor"]]
  if r["gmm"]:
    names = list(r["gmm"][0]["tflops"])
    rows += ["", "| grouped matmul (rows, d -> f, groups) | " + " | ".join(
        f"{n} TFLOP/s" for n in names) + " |", "|---|" + "---|" * len(names)]
    rows += [f"| {g['m']}, {g['k']} -> {g['n']}, {g['groups']} | " + " | ".join(
        f"{g['tflops'][n]:.1f}" for n in names) + " |" for g in r["gmm"]]
  t, d, dtype = r["layer"][0]["T"], r["layer"][0]["d"], r["layer"][0]["dtype"]
  return "\n".join([f"{_source(r)}; T={t} d={d} {dtype}", "", *rows])


def train(r: dict) -> str:
  """experiments.bench_train --out: training throughput and MFU."""
  dense = {x["model"]: x["step_s"] for x in r["runs"] if not x["experts"]}
  rows = ["| model | experts | backend | params (active) | batch | remat | step ms | step / "
          "dense step | tokens/s | model TFLOP/s | MFU |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for x in r["runs"]:
    rel = f"{x['step_s'] / dense[x['model']]:.2f}" if x["model"] in dense else ""
    mfu = "n/a" if x["mfu"] is None else f"{x['mfu']:.3f}"
    experts = f"{x['experts']} top-{x['top_k']}" if x["experts"] else "dense"
    rows.append(f"| {x['model']} | {experts} | {x['backend']} | {x['params'] / 1e6:.0f}M "
                f"({x['active_params'] / 1e6:.0f}M) | {x['batch']}x{x['length']} | "
                f"{x['remat']} | {x['step_s'] * 1e3:.1f} | {rel} | {x['tokens_per_s']:.0f} | "
                f"{x['model_tflops_per_s']:.3g} | {mfu} |")
  order = ("; the models alternated round by round, each its best round" if r.get("alternated")
           else "")
  return "\n".join([f"{_source(r)}; compute {r['runs'][0]['dtype']}, params "
                    f"{r['runs'][0]['param_dtype']}{order}", "", *rows])


def _span(values: list[float]) -> str:
  lo, hi = min(values), max(values)
  return f"{lo:.3f}" if lo == hi else f"{lo:.3f}-{hi:.3f}"


def summary(r: dict) -> str:
  """summary_*: the bench_moe --out files that r['runs'] names (RESULTS/NAME.json), each
  ratio as its range over those runs, per shape and backend."""
  runs = []
  for name in r["runs"]:
    with open(os.path.join(RESULTS, f"{name}.json"), encoding="utf-8") as f:
      runs.append(json.load(f))
  ratios, peers, floors = {}, {}, {}
  loops = {n: {} for n, _ in LOOPS}
  for run in runs:
    best = _fastest_peer(run)
    for x in run["layer"]:
      key = (x["E"], x["f"], x["k"], x["backend"])
      ratios.setdefault(key, []).append(x["ratio"])
      if key[:3] in best:
        peers.setdefault(key, []).append(x["moe_s"] / best[key[:3]])
    for x in run.get("floor", []):
      floors.setdefault((x["E"], x["f"], x["k"]), []).append(x["ratio"])
      for n in loops:
        if f"{n}_ratio" in x:
          loops[n].setdefault((x["E"], x["f"], x["k"]), []).append(x[f"{n}_ratio"])
  shown = [(n, label) for n, label in LOOPS if loops[n]]
  rows = ["| E | f | k | backend | MoE / dense | MoE / fastest transformers block | experts alone "
          "(floor) / dense |" + "".join(f" {label} / dense |" for _, label in shown),
          "|---|---|---|---|---|---|---|" + "---|" * len(shown)]
  cell = lambda d, k: _span(d[k]) if k in d else ""
  for key, values in ratios.items():
    shape = key[:3]
    rows.append(f"| {' | '.join(map(str, key))} | {_span(values)} | {cell(peers, key)} | "
                f"{cell(floors, shape)} |" + "".join(f" {cell(loops[n], shape)} |"
                                                    for n, _ in shown))
  first = runs[0]
  dates = sorted({run["date"] for run in runs})
  return "\n".join([f"{len(runs)} runs ({', '.join(f'`{n}.json`' for n in r['runs'])}; "
                    f"{first['machine']}, {first['device']}, jax {first['jax']}, "
                    f"{', '.join(dates)}). The first: `{first['command']}`. Each cell is the "
                    "range over the runs.", "", *rows])


RENDERERS = {"generate_smollm2": generate_smollm2, "harness_smollm2": harness_smollm2}
PREFIXES = {"kernels_": kernels, "layer_": layer, "train_": train, "summary_": summary}


def renderer(name: str):
  if name in RENDERERS:
    return RENDERERS[name]
  for prefix, fn in PREFIXES.items():
    if name.startswith(prefix):
      return fn
  raise ValueError(f"docs/benchmarks.md: results:{name}: no renderer; expected one of "
                   f"{sorted(RENDERERS)} or a name starting with one of {sorted(PREFIXES)}")


def main() -> int:
  doc = open(DOC, encoding="utf-8").read()
  for name in re.findall(r"<!-- results:(\w+) -->", doc):
    with open(os.path.join(RESULTS, f"{name}.json"), encoding="utf-8") as f:
      table = renderer(name)(json.load(f))
    doc = re.sub(rf"(<!-- results:{name} -->\n)(.*?\n)?(<!-- /results:{name} -->)",
                 lambda m: m.group(1) + table + "\n" + m.group(3), doc, flags=re.S)
  with open(DOC + ".tmp", "w", encoding="utf-8") as f:
    f.write(doc)
  os.replace(DOC + ".tmp", DOC)
  return 0


if __name__ == "__main__":
  sys.exit(main())
