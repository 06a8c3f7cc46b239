"""What every binary shares: absl flag parsing and the error boundary.

A bad flag, an unknown config key or a user error (bad path, bad value) is one line on
stderr and exit status 1, never a traceback.
"""
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
