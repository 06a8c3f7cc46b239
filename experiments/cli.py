"""What every binary shares: absl flag parsing and the error boundary.

A bad flag, an unknown config key or a user error (bad path, bad value) is one line on
stderr and exit status 1, never a traceback.
"""
import ctypes
import ctypes.util
import re
import sys
from collections.abc import Callable

from absl import flags, logging

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               FloatingPointError)


def parse_flags(argv: list[str]) -> list[str]:
  """For app.run(..., flags_parser=parse_flags)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise assorted types
    msg = " ".join(re.sub(r"\\n|[\\'\"]", " ", str(e)).split())
    print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
    sys.exit(1)


def main_guard(fn: Callable, *args, **kwargs):
  """Runs `fn`; a user error becomes one line on stderr and exit status 1."""
  if logging.get_verbosity() == logging.INFO:  # orbax logs every file at INFO; keep warnings
    logging.set_verbosity(logging.WARNING)
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def map_large_host_arrays(threshold: int = 1 << 20) -> bool:
  """glibc only: host allocations of `threshold` bytes or more get their own mapping,
  returned to the OS when freed. glibc otherwise raises this threshold to the size of
  the largest array freed so far and serves later arrays from a heap that fragments: a
  layer-by-layer pass then holds its high-water mark instead of one layer. Costs fresh
  pages for every large array. Returns whether it was set."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name) if name else None
    return bool(libc and libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD
  except (OSError, AttributeError):  # not glibc
    return False
