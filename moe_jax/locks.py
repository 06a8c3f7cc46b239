"""One writer per output: an exclusive lock beside each workdir or output directory.

`hold(path)` takes a `flock` on `<parent>/.<name>.lock` for as long as the block runs; a
second train, upcycle or export into the same path is refused in one line naming the
holder. The lock goes with the process (a SIGKILL frees it, leaving the small file for
the next run to take); a clean exit removes the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator


class Busy(FileExistsError):
  """Another live process holds the path's lock."""


def lock_path(path: str) -> str:
  parent, name = os.path.split(os.path.abspath(path))
  return os.path.join(parent, f".{name}.lock")


def _acquire(lock: str, path: str) -> int:
  """An fd holding the flock of the file now at `lock` (retried if a releasing holder
  unlinked the file between our open and our flock)."""
  for _ in range(10):
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise Busy(f"{os.path.abspath(path)}: in use by another run ({holder}); wait for it "
                 "or choose another path") from None
    try:
      same = os.stat(lock).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd
    os.close(fd)
  raise Busy(f"{os.path.abspath(path)}: its lock {lock} keeps changing; another run is "
             "starting or stopping there")


@contextlib.contextmanager
def hold(path: str) -> Iterator[None]:
  lock = lock_path(path)
  os.makedirs(os.path.dirname(lock), exist_ok=True)
  fd = _acquire(lock, path)
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    yield
  finally:
    try:
      os.unlink(lock)  # still holding it: a newcomer that opened it retries (_acquire)
    except FileNotFoundError:
      pass
    os.close(fd)
