"""Upcycling methods as pure numpy functions on one layer's FFN, in a registry.

A dense SwiGLU FFN is y = (silu(x Wg) * (x Wu)) Wd with Wg, Wu [D, F] and Wd [F, D].
Each method returns stacked experts [E, D, Fe] / [E, Fe, D] and `router_repeat`:
router column r is shared by experts r*repeat .. r*repeat+repeat-1. Formulas and
references: ../shared/METHODS.md.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

ROUTERS = ("topk_softmax", "softmax_topk", "sigmoid_bias")


class DenseFfn(NamedTuple):
  w_gate_DxF: np.ndarray
  w_up_DxF: np.ndarray
  w_down_FxD: np.ndarray


class ExpertFfn(NamedTuple):
  w_gate_ExDxF: np.ndarray
  w_up_ExDxF: np.ndarray
  w_down_ExFxD: np.ndarray
  router_repeat: int = 1


@dataclasses.dataclass(frozen=True)
class UpcycleSpec:
  method: str
  num_experts: int
  top_k: int
  granularity: int = 1
  router: str = "topk_softmax"
  norm_topk_prob: bool = False
  partition: str = "random"          # partition: random | kmeans
  output_scale: float = 0.0          # partition: multiplier on the sum of the k chosen experts (0 = E/k)
  drop_ratio: float = 0.5
  drop_shared_indices: bool = False  # drop: one index set for gate, up and down
  noise_std: float = 0.02
  shared_expert: bool = False        # add the dense FFN as an (ungated) shared expert

  def validate(self, ffn_dim: int) -> None:
    e, g, k = self.num_experts, self.granularity, self.top_k
    if self.method not in METHODS:
      raise ValueError(f"upcycle.method={self.method!r}: expected one of {sorted(METHODS)}")
    if self.router not in ROUTERS:
      raise ValueError(f"upcycle.router={self.router!r}: expected one of {ROUTERS}")
    if not 1 <= k <= e:
      raise ValueError(f"upcycle.topk={k}: expected 1 <= topk <= experts={e}")
    if self.method == "virtual_group":
      if g < 1 or ffn_dim % g:
        raise ValueError(f"upcycle.granularity={g} does not divide ffn_dim={ffn_dim}")
      if e % g:
        raise ValueError(f"upcycle.experts={e} is not a multiple of granularity={g}")
      if k % g:
        raise ValueError(f"upcycle.topk={k} is not a multiple of granularity={g}")
    elif g != 1:
      raise ValueError(f"upcycle.granularity={g}: only method 'virtual_group' splits experts")
    if self.method == "partition" and ffn_dim % e:
      raise ValueError(f"upcycle.experts={e} does not divide ffn_dim={ffn_dim} (partition)")
    if self.method == "partition" and self.partition not in ("random", "kmeans"):
      raise ValueError(f"upcycle.partition={self.partition!r}: expected random or kmeans")
    if not 0.0 <= self.drop_ratio <= 1.0:
      raise ValueError(f"upcycle.drop_ratio={self.drop_ratio}: expected a value in [0, 1]")

  def expert_dim(self, ffn_dim: int) -> int:
    if self.method == "virtual_group":
      return ffn_dim // self.granularity
    if self.method == "partition":
      return ffn_dim // self.num_experts
    return ffn_dim

  def uniform_weight(self) -> float:
    """Each chosen expert's routing weight under a uniform (zero) router."""
    if self.router == "softmax_topk" and not self.norm_topk_prob:
      return 1.0 / self.num_experts
    return 1.0 / self.top_k


def _stack(dense: DenseFfn, e: int) -> ExpertFfn:
  return ExpertFfn(*(np.repeat(w[None], e, axis=0) for w in dense))


def copy(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """Sparse upcycling: every expert is the dense FFN."""
  del rng
  return _stack(dense, spec.num_experts)


def virtual_group(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """Fine-grained experts: G contiguous neuron shards, expert e gets shard e mod G, the G
  experts of a group share a router column; scale on the down projection only (exact for
  SwiGLU): a = G when the chosen weights sum to 1, a = E*G/T for softmax-then-topK."""
  del rng
  e, g = spec.num_experts, spec.granularity
  f = dense.w_gate_DxF.shape[1]
  fs = f // g
  shard = lambda s: slice(s * fs, (s + 1) * fs)
  scale = g if spec.uniform_weight() == 1.0 / spec.top_k else e * g / spec.top_k
  return ExpertFfn(
      np.stack([dense.w_gate_DxF[:, shard(i % g)] for i in range(e)]),
      np.stack([dense.w_up_DxF[:, shard(i % g)] for i in range(e)]),
      np.stack([dense.w_down_FxD[shard(i % g)] * scale for i in range(e)]),
      router_repeat=g)


def balanced_kmeans(points_NxD: np.ndarray, k: int, rng: np.random.Generator,
                    iters: int = 20) -> np.ndarray:
  """Cluster labels [N] with exactly N/k points per cluster: Lloyd's k-means, then a
  greedy balanced assignment (closest pairs first, each cluster capped at N/k)."""
  n = points_NxD.shape[0]
  cap = n // k
  centers = points_NxD[rng.choice(n, k, replace=False)]
  labels = np.zeros(n, np.int64)
  for _ in range(iters):
    dist = ((points_NxD[:, None] - centers[None]) ** 2).sum(-1)
    labels = _balanced_assign(dist, cap)
    centers = np.stack([points_NxD[labels == c].mean(0) for c in range(k)])
  return labels


def _balanced_assign(dist_NxK: np.ndarray, cap: int) -> np.ndarray:
  n, k = dist_NxK.shape
  labels = -np.ones(n, np.int64)
  room = np.full(k, cap)
  for flat in np.argsort(dist_NxK, axis=None, kind="stable"):
    i, c = divmod(int(flat), k)
    if labels[i] < 0 and room[c] > 0:
      labels[i], room[c] = c, room[c] - 1
  return labels


def partition_sets(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> list[np.ndarray]:
  """E disjoint neuron index sets of F/E each (random, or balanced k-means)."""
  f, e = dense.w_gate_DxF.shape[1], spec.num_experts
  if spec.partition == "random":
    return [np.sort(s) for s in np.split(rng.permutation(f), e)]
  rows = np.concatenate([dense.w_gate_DxF.T, dense.w_up_DxF.T], axis=1)
  rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
  labels = balanced_kmeans(rows, e, rng)
  return [np.flatnonzero(labels == c) for c in range(e)]


def partition(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """LLaMA-MoE neuron partitioning. The k chosen experts' plain sum is scaled by
  `output_scale` (default E/k); as router weights are uniform_weight() each, the down
  projections carry output_scale / uniform_weight. With k = E and a uniform router the
  dense FFN is reproduced exactly (the E partitions sum to it)."""
  sets = partition_sets(dense, spec, rng)
  e, k = spec.num_experts, spec.top_k
  scale = (spec.output_scale or e / k) / spec.uniform_weight()
  return ExpertFfn(np.stack([dense.w_gate_DxF[:, s] for s in sets]),
                   np.stack([dense.w_up_DxF[:, s] for s in sets]),
                   np.stack([dense.w_down_FxD[s] * scale for s in sets]))


def drop_indices(f: int, spec: UpcycleSpec, rng: np.random.Generator) -> np.ndarray:
  """[E, 3, round(r*F)] neuron indices re-initialised per expert for gate, up, down."""
  n = int(round(spec.drop_ratio * f))
  idx = np.empty((spec.num_experts, 3, n), np.int64)
  for e in range(spec.num_experts):
    for m in range(3):
      idx[e, m] = idx[e, 0] if (spec.drop_shared_indices and m) else np.sort(
          rng.choice(f, n, replace=False))
  return idx


def drop(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """Drop-Upcycling: copy, then per expert re-initialise a fraction r of the neurons
  (gate/up columns, down rows) from N(mean, std) of the original matrix."""
  out = [np.array(w) for w in _stack(dense, spec.num_experts)[:3]]
  idx = drop_indices(dense.w_gate_DxF.shape[1], spec, rng)
  for m, (w, orig) in enumerate(zip(out, dense)):
    mu, sd = float(orig.mean()), float(orig.std())
    for e in range(spec.num_experts):
      if m < 2:
        w[e][:, idx[e, m]] = rng.normal(mu, sd, (w.shape[1], idx.shape[2]))
      else:
        w[e][idx[e, m], :] = rng.normal(mu, sd, (idx.shape[2], w.shape[2]))
  return ExpertFfn(*out)


def noise(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """Copy, plus N(0, noise_std) on every expert weight."""
  return ExpertFfn(*(w + rng.normal(0.0, spec.noise_std, w.shape).astype(w.dtype)
                     for w in _stack(dense, spec.num_experts)[:3]))


def merge(denses: Sequence[DenseFfn], spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """BTX / mergekit-moe: expert i is model i's FFN (E = number of models)."""
  del rng
  if len(denses) != spec.num_experts:
    raise ValueError(f"upcycle.experts={spec.num_experts} but {len(denses)} merge sources")
  for i, d in enumerate(denses[1:], 1):
    if any(a.shape != b.shape for a, b in zip(d, denses[0])):
      raise ValueError(f"merge source {i}: FFN shapes {[a.shape for a in d]} differ from "
                       f"source 0's {[a.shape for a in denses[0]]}")
  return ExpertFfn(*(np.stack(ws) for ws in zip(*denses)))


METHODS: dict[str, Callable] = {"copy": copy, "virtual_group": virtual_group,
                                "partition": partition, "drop": drop, "noise": noise,
                                "merge": merge}
