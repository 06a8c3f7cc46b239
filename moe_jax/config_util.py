"""Helpers for ml_collections configs: big_vision-style string arguments."""
from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=x,runlocal' into a ConfigDict typed by `defaults`.

  A bare name sets a bool default to True. Unknown names raise ValueError naming them.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r}: unknown; expected one of {sorted(defaults)}")
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f"config argument {key!r}: needs a value ({key}=...)")
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r}: expected {kind.__name__}") from None
  return ml_collections.ConfigDict(out)


def load_module(path: str):
  """The Python module at `path` (a config module that also defines a sweep or a study)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("moe_jax_config_module", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod
