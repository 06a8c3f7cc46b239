"""Executes the notebooks into a folder git ignores (`make notebooks`):

  python notebooks/execute.py [--out notebooks/executed] [--runlocal] [01_upcycle_and_compare ...]

Each notebook runs in a fresh kernel whose working directory is the output folder, so the
runs it writes land beside the executed copy. A failing cell stops its notebook; the
executed copy is still written (with the traceback in that cell) and the error is one line
naming the notebook, the cell and the exception. `--runlocal` sets MOE_JAX_RUNLOCAL=1 in
the kernel: each notebook then runs its smallest sizes (fewer steps and windows), as the
test suite does.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\d+")


class NotebookError(RuntimeError):
  """A cell of a notebook failed: the message names the notebook, the cell and the error."""


def notebooks(names: list[str] | tuple[str, ...] = ()) -> list[str]:
  """Paths of the repository's notebooks (all, or those whose names start with `names`)."""
  paths = sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".ipynb"))
  if not names:
    return paths
  chosen = [p for p in paths if any(os.path.basename(p).startswith(n) for n in names)]
  unknown = [n for n in names if not any(os.path.basename(p).startswith(n) for p in paths)]
  if unknown:
    raise NotebookError(f"{unknown[0]}: no such notebook in {HERE}")
  return chosen


def kernel_env(runlocal: bool = False) -> dict[str, str]:
  """This process's environment without fake CPU devices (the test suite sets 8): a
  notebook runs on the devices a user has. `runlocal`: MOE_JAX_RUNLOCAL=1."""
  env = dict(os.environ)
  env.pop("MOE_JAX_RUNLOCAL", None)
  if runlocal:
    env["MOE_JAX_RUNLOCAL"] = "1"
  flags = FAKE_DEVICES.sub("", env.get("XLA_FLAGS", "")).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  return env


def _failure(nb, name: str, err: CellExecutionError) -> str:
  """'NAME: cell I of N (`first line`) failed: Error: message'."""
  for i, cell in enumerate(nb.cells, 1):
    if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
      first = next((line for line in cell.source.splitlines() if line.strip()), "")
      return (f"{name}: cell {i} of {len(nb.cells)} (`{first.strip()[:60]}`) failed: "
              f"{err.ename}: {err.evalue}")
  return f"{name}: failed: {err.ename}: {err.evalue}"


def execute(path: str, out_dir: str, timeout: int = 900, runlocal: bool = False) -> str:
  """Runs the notebook at `path` top to bottom; writes the executed copy to `out_dir` and
  returns its path. Raises NotebookError naming the failing cell."""
  name = os.path.basename(path)
  nb = nbformat.read(path, as_version=4)
  os.makedirs(out_dir, exist_ok=True)
  out = os.path.join(out_dir, name)
  client = NotebookClient(nb, timeout=timeout, kernel_name="python3")
  try:
    client.execute(cwd=out_dir, env=kernel_env(runlocal))
  except CellExecutionError as e:
    raise NotebookError(_failure(nb, name, e)) from None
  finally:
    nbformat.write(nb, out)
  return out


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", help="notebook name prefixes (default: all)")
  parser.add_argument("--out", default=os.path.join(HERE, "executed"))
  parser.add_argument("--runlocal", action="store_true", help="the smallest sizes (as the tests)")
  args = parser.parse_args(argv)
  try:
    for path in notebooks(args.names):
      t0 = time.time()
      out = execute(path, os.path.abspath(args.out), runlocal=args.runlocal)
      print(f"{os.path.basename(path)}: ok in {time.time() - t0:.0f} s -> {out}", flush=True)
  except NotebookError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
