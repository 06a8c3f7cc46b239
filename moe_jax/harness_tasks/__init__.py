"""Tasks for lm-evaluation-harness that need no hub download, in the harness's YAML format.

`pydoc_next`: given one or two sentences of a paragraph of the Python reference (the
interpreter's `pydoc_data.topics`), pick the sentence that really follows among four; the
other three come from other paragraphs, of similar length. `python -m moe_jax.harness_tasks`
regenerates its JSONL (committed, so that scores compare across Python versions).

A task of your own is a directory with a YAML like pydoc_next/pydoc_next.yaml (for a local
JSONL: `dataset_path: json` and `dataset_kwargs: {data_files: {test: /abs/path.jsonl}}`);
pass the YAML's path in `--config.tasks` or its directory to `--include_path`.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
PYDOC_NEXT = os.path.join(TASKS_DIR, "pydoc_next", "pydoc_next.jsonl")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(*])")


def _paragraphs(topics: dict[str, str]) -> list[list[str]]:
  """Prose paragraphs (code and indented blocks left out) as lists of sentences."""
  out = []
  for name in sorted(topics):
    for para in re.split(r"\n\s*\n", topics[name]):
      if para.startswith((" ", "\t")):
        continue
      sentences = _SENTENCE.split(" ".join(para.split()))
      if len(sentences) >= 2 and all(30 <= len(s) <= 300 for s in sentences):
        out.append(sentences)
  return out


def pydoc_next_docs(topics: dict[str, str], seed: int = 0, max_docs: int = 400) -> list[dict]:
  """One doc per paragraph: {"context", "choices" (4), "label"}, deterministic in `seed`."""
  paras = _paragraphs(topics)
  rng = np.random.default_rng(seed)
  pool = [(i, s) for i, p in enumerate(paras) for s in p]
  docs = []
  for i in rng.permutation(len(paras))[:max_docs]:
    sentences = paras[i]
    j = int(rng.integers(1, len(sentences)))
    true = sentences[j]
    near = list(dict.fromkeys(  # distinct sentences, in a fixed order
        s for k, s in pool if k != i and 0.5 <= len(s) / len(true) <= 2.0 and s != true))
    if len(near) < 3:
      continue
    wrong = [near[k] for k in rng.choice(len(near), 3, replace=False)]
    label = int(rng.integers(0, 4))
    choices = wrong[:label] + [true] + wrong[label:]
    docs.append({"context": " ".join(sentences[max(0, j - 2):j]), "choices": choices,
                 "label": label})
  return docs


def write_jsonl(docs: list[dict], path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps(d, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
