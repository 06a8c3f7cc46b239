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


RENDERERS = {"generate_smollm2": generate_smollm2}


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
