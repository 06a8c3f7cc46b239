"""What the one-line error messages share."""


def one_line(e: BaseException) -> str:
  """An error's message with its whitespace (newlines too) folded to single spaces."""
  return " ".join(str(e).split())


class Stopped(Exception):
  """A run stopped on request (SIGTERM) after saving its checkpoint: not finished, so no
  final record is written, and the same command resumes it. The binaries exit 0."""
