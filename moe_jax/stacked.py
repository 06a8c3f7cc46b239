"""ExpertStack: an [E, ...] array of expert weights that builds one expert at a time.

Upcycling methods return their expert weights as ExpertStacks so the streaming converter
can write a layer expert by expert (one [D, F] slice in memory, not the [E, D, F] stack);
anything that wants the whole array calls np.asarray(stack).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class ExpertStack:
  """`stack[e]` builds expert e with `build(e)` (the same array on every call);
  `np.asarray(stack)` builds them all; `stack.astype(dtype)` casts lazily."""

  def __init__(self, num_experts: int, build: Callable[[int], np.ndarray],
               expert_shape: Sequence[int], dtype):
    self.num_experts, self._build = num_experts, build
    self.expert_shape, self.dtype = tuple(expert_shape), np.dtype(dtype)

  @classmethod
  def of(cls, experts: Sequence[np.ndarray]) -> "ExpertStack":
    """A stack over arrays that already exist (no copy until np.asarray)."""
    first = np.asarray(experts[0])
    return cls(len(experts), lambda e: experts[e], first.shape, first.dtype)

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.num_experts, *self.expert_shape)

  @property
  def ndim(self) -> int:
    return 1 + len(self.expert_shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.num_experts

  def expert(self, e: int) -> np.ndarray:
    if not -self.num_experts <= e < self.num_experts:
      raise IndexError(f"expert {e} out of range for {self.num_experts} experts")
    w = np.asarray(self._build(e % self.num_experts))
    if w.shape != self.expert_shape:
      raise ValueError(f"expert {e}: built shape {w.shape}, expected {self.expert_shape}")
    return w.astype(self.dtype, copy=False)

  def __getitem__(self, key):
    if isinstance(key, (int, np.integer)):
      return self.expert(int(key))
    return np.asarray(self)[key]

  def __iter__(self):
    return (self.expert(e) for e in range(self.num_experts))

  def __array__(self, dtype=None, copy=None):
    del copy
    out = np.empty(self.shape, dtype or self.dtype)
    for e in range(self.num_experts):
      out[e] = self.expert(e)
    return out

  def astype(self, dtype, copy: bool = True) -> "ExpertStack":
    del copy
    return ExpertStack(self.num_experts, self._build, self.expert_shape, dtype)

  def scaled(self, a) -> "ExpertStack":
    """Each expert times `a`, computed when built."""
    build = self._build
    return ExpertStack(self.num_experts, lambda e: np.asarray(build(e)) * a,
                       self.expert_shape, self.dtype)

  def __repr__(self) -> str:
    return f"ExpertStack(shape={self.shape}, dtype={self.dtype})"


def materialize(x):
  """np.asarray of an ExpertStack, anything else unchanged."""
  return np.asarray(x) if isinstance(x, ExpertStack) else x
