"""Test setup: 8 fake CPU devices for sharded paths (set before jax is imported), and one
persistent XLA compilation cache shared by the test processes and the binaries they start.

The binaries under test (train, evaluate, sweep, multi-process runs) are started many
times with the same small configs; the cache turns their repeated compiles into reads.
A cached executable is the same program, so bitwise checks (exact resume) are unaffected.
"""
import os
import tempfile

import subproc

os.environ.setdefault("XLA_FLAGS", subproc.xla_flags(devices=8))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"moe_jax_test_xla_cache_{os.getuid()}"))
# Every program, however quick to compile: the binaries share many small ones (init, eval
# step, schedules); cold, the whole suite ran 320 s against 340 s at a 0.5 s threshold.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# The longest file first: with one worker per file (--dist loadfile), a long file that
# starts late finishes last, after the other worker has run out of work.
_FIRST = ("test_notebooks.py", "test_study.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  items.sort(key=lambda item: item.path.name not in _FIRST)  # stable: keeps the rest's order
