"""Text sources: the embedded corpora (no downloads) and a user's local files.

Evaluation text: the interpreter's `pydoc_data.topics` (English documentation).
Training text: the standard library's non-test `.py` files, split deterministically into
train/valid by a hash of each file's relative path; with source `stdlib+pydoc`, also the
pydoc topics split by a hash of the topic name (then `embedded_eval_text`, all topics,
overlaps that run's training text).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig

_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def embedded_eval_text() -> str:
  """pydoc's topic help texts, joined in sorted key order (~465k characters)."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _is_test(rel: str) -> bool:
  parts = rel.split(os.sep)
  name = parts[-1]
  return (bool(_TEST_DIRS.intersection(parts[:-1])) or name.startswith("test_")
          or name.endswith("_test.py") or name == "conftest.py")


def _check_split(split: str) -> None:
  if split not in ("train", "valid"):
    raise ValueError(f"split={split!r}: expected 'train' or 'valid'")


def _in_split(key: str, split: str, valid_percent: int) -> bool:
  """The deterministic train/valid assignment of a document by a hash of its key."""
  _check_split(split)
  bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
  return (bucket < valid_percent) == (split == "valid")


def pydoc_documents(split: str = "train", valid_percent: int = 10) -> list[str]:
  """pydoc's topic help texts (English), one document per topic, in sorted key order,
  split into train/valid by a hash of the topic name."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return [topics.topics[k] for k in sorted(topics.topics) if _in_split(k, split, valid_percent)]


def stdlib_files(split: str = "train", valid_percent: int = 5) -> list[str]:
  """Sorted paths of the standard library's non-test .py files in `split`."""
  _check_split(split)
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _TEST_DIRS)
    for name in sorted(filenames):
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      if not name.endswith(".py") or _is_test(rel):
        continue
      if _in_split(rel, split, valid_percent):
        out.append(os.path.join(root, rel))
  return out


def stdlib_documents(split: str = "train") -> list[str]:
  docs = []
  for path in stdlib_files(split):
    with open(path, encoding="utf-8", errors="replace") as f:
      docs.append(f.read())
  return docs


def read_text_file(path: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: text file not found")
  with open(path, encoding="utf-8", errors="strict") as f:
    try:
      return f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path: str, field: str = "text") -> list[str]:
  """One document per line: the string under `field` of each JSON object."""
  docs = []
  for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      doc = json.loads(line)[field]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ValueError(f"{path}:{lineno}: expected a JSON object with a string {field!r}") from None
    if not isinstance(doc, str):
      raise ValueError(f"{path}:{lineno}: {field!r} is not a string")
    docs.append(doc)
  return docs


def read_documents(path: str, field: str = "text") -> list[str]:
  """A local .jsonl file (one document per line) or a plain text file (one document)."""
  if path.endswith((".jsonl", ".json")):
    return read_jsonl(path, field)
  return [read_text_file(path)]


LOCAL_BUILDERS = ("json", "parquet", "text", "csv")


def held_out(docs: list[str], percent: int = 5) -> tuple[list[str], list[str]]:
  """(train, eval): the first `percent`% of the documents (at least one) are never trained
  on. A single document is both."""
  cut = max(1, len(docs) * percent // 100)
  return docs[cut:] or docs, docs[:cut]


def hf_documents(spec: str, field: str = "text") -> tuple[list[str], list[str]]:
  """(train, eval) texts read through Hugging Face `datasets`. `spec` is BUILDER:FILES for a
  local file or glob (load_dataset(BUILDER, data_files=FILES), BUILDER one of
  LOCAL_BUILDERS; `text` gives one document per line) or a hub dataset name. Eval is the
  validation (or test) split, else the held-out first 5% of train."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"data.source=hf:{spec}: the `datasets` package is not installed "
                     "(pip install moe_jax[eval])") from None
  builder, _, files = spec.partition(":")
  where = f"data.source=hf:{spec}"
  try:
    if builder in LOCAL_BUILDERS and files:
      if not any(os.path.exists(f) for f in _expand(files)):
        raise FileNotFoundError(f"{files}: file not found")
      datasets.disable_progress_bars()
      ds = datasets.load_dataset(builder, data_files=files)
    else:
      ds = datasets.load_dataset(spec)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{where}: {str(e).splitlines()[0]}") from None
  except Exception as e:  # the datasets builders' own errors (parse, network), many classes
    lines = str(e).strip().splitlines()
    raise ValueError(f"{where}: {type(e).__name__}: {lines[0] if lines else ''}") from None
  columns = ds["train"].column_names
  if field not in columns:
    raise ValueError(f"{where}: no column {field!r} (config.data.field); columns: {columns}")
  train = ds["train"][field]
  if not all(isinstance(t, str) for t in train):
    raise ValueError(f"{where}: column {field!r} holds non-text values")
  split = "validation" if "validation" in ds else "test" if "test" in ds else None
  return (train, ds[split][field]) if split else held_out(train)


def _expand(files: str) -> list[str]:
  return glob.glob(files) or [files]


def interleave(a: list[str], b: list[str]) -> list[str]:
  """The documents of a and b alternating, in proportion to their counts (so that a
  prefix, as `data.max_docs` takes, holds both domains)."""
  out, i, j = [], 0, 0
  while i < len(a) or j < len(b):
    if j >= len(b) or (i < len(a) and i * len(b) <= j * len(a)):
      out.append(a[i])
      i += 1
    else:
      out.append(b[j])
      j += 1
  return out
