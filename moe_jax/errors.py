"""What the one-line error messages share."""


def one_line(e: BaseException) -> str:
  """An error's message with its whitespace (newlines too) folded to single spaces."""
  return " ".join(str(e).split())
