"""What every binary shares: absl flag parsing and the error boundary.

A bad flag, an unknown config key or a user error (bad path, bad value) is one line on
stderr and exit status 1, never a traceback.
"""
import ctypes
import ctypes.util
import logging as std_logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable

from absl import flags, logging

from moe_jax import errors

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


TRACEBACK = "MOE_JAX_TRACEBACK"  # =1: let unexpected errors raise with their traceback


def describe_error(e: BaseException) -> str:
  """One line for an error: an OS error (disk full, permission, missing file) names its
  file; anything else is its message with the whitespace folded."""
  if isinstance(e, OSError) and e.filename is not None:
    return f"{e.filename}: {e.strerror or e}"
  return errors.one_line(e) or type(e).__name__


def _exit_on_sigterm(signum, frame):
  """SIGTERM as SystemExit(143): `finally` and `except BaseException` blocks run (the
  training loop installs its own handler, which saves a checkpoint first)."""
  del frame
  raise SystemExit(128 + signum)


def _drop_background_tracebacks(record) -> bool:
  """False for orbax's logged tracebacks of a failed background write: the same error
  reaches the caller, and main_guard reports it in one line."""
  return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def main_guard(fn: Callable, *args, **kwargs):
  """Runs `fn`. A user error or an OS error (a full disk is one) becomes one line on
  stderr and exit status 1; so does any other error (orbax, safetensors, gguf), named by
  its type, unless MOE_JAX_TRACEBACK=1 asks for the traceback."""
  if logging.get_verbosity() == logging.INFO:  # orbax logs every file at INFO; keep warnings
    logging.set_verbosity(logging.WARNING)
  signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that temp dirs are cleaned up
  if os.environ.get(TRACEBACK) != "1":  # orbax's writer threads re-raise in the caller,
    threading.excepthook = lambda a: logging.debug("thread %s: %r", a.thread, a.exc_value)
    logging.get_absl_logger().addFilter(_drop_background_tracebacks)  # reported once there
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)  # "never retrieved"
    # and tensorstore's callbacks print their own (PyErr_Print: sys.excepthook) after it
    sys.excepthook = lambda *exc: logging.debug("background error: %r", exc[1])
    sys.unraisablehook = lambda u: logging.debug("unraisable: %r", u.exc_value)
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
  try:
    return fn(*args, **kwargs)
  except errors.Stopped as e:  # saved on SIGTERM: not an error, and not finished
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(0)
  except USER_ERRORS + (OSError,) as e:
    print(f"error: {describe_error(e)}", file=sys.stderr)
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get(TRACEBACK) == "1":
      raise
    print(f"error: {type(e).__name__}: {describe_error(e)[:500]} (set {TRACEBACK}=1 for the "
          "traceback)", file=sys.stderr)
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
