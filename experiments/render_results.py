"""Regenerates the tables of docs/benchmarks.md that come from docs/results/*.json.

  python -m experiments.render_results

Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`, and is
rendered from docs/results/NAME.json by RENDERERS[NAME].
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")


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


RENDERERS = {"generate_smollm2": generate_smollm2, "harness_smollm2": harness_smollm2}


def main() -> int:
  doc = open(DOC, encoding="utf-8").read()
  for name in re.findall(r"<!-- results:(\w+) -->", doc):
    with open(os.path.join(ROOT, "docs", "results", f"{name}.json"), encoding="utf-8") as f:
      table = RENDERERS[name](json.load(f))
    doc = re.sub(rf"(<!-- results:{name} -->\n)(.*?\n)?(<!-- /results:{name} -->)",
                 lambda m: m.group(1) + table + "\n" + m.group(3), doc, flags=re.S)
  with open(DOC + ".tmp", "w", encoding="utf-8") as f:
    f.write(doc)
  os.replace(DOC + ".tmp", DOC)
  return 0


if __name__ == "__main__":
  sys.exit(main())
