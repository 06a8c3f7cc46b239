"""Upcycling methods as pure numpy functions on one layer's FFN, in a registry.

A dense SwiGLU FFN is y = (silu(x Wg) * (x Wu)) Wd with Wg, Wu [D, F] and Wd [F, D]
(`DenseFfn`). A method turns it into stacked experts (`ExpertFfn`): Wg, Wu [E, D, Fe] and
Wd [E, Fe, D], `router_repeat` (experts e with equal e // router_repeat share one router
column) and, with `spec.shared_expert`, the dense FFN as an always-on shared expert:

    experts = METHODS[spec.method](dense, spec, rng)   # merge, bam: a list of FFNs

Methods leave `router_DxE` None: router_init.init_router draws or computes the router.

Scales. Let w0 be each chosen expert's routing weight under a uniform (zero) router:
1/k when the chosen weights sum to 1 (topk_softmax, sigmoid_bias, renormalised
softmax_topk) and 1/E for softmax_topk without renormalisation (`uniform_weight`). A
method that wants the PLAIN SUM of the k chosen experts scaled by s multiplies the down
projections by s / w0. Scaling Wd alone is exact for any activation (SiLU is not
homogeneous, so splitting s over gate, up and down as Megatron does is not). Router
scaling factors (MoeConfig.topk_scaling_factor) are taken to be 1.

Formulas and references: ../shared/METHODS.md.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from moe_jax.moe import routers
from moe_jax.stacked import ExpertStack
from moe_jax.upcycle import router_init

ROUTERS = routers.TOKEN_CHOICE  # an upcycled decoder routes token by token
PARTITIONS = ("random", "kmeans")


class DenseFfn(NamedTuple):
  w_gate_DxF: np.ndarray
  w_up_DxF: np.ndarray
  w_down_FxD: np.ndarray


class ExpertFfn(NamedTuple):
  """Expert weights as ExpertStacks: `w[e]` builds expert e alone, np.asarray(w) all."""
  w_gate_ExDxFe: ExpertStack
  w_up_ExDxFe: ExpertStack
  w_down_ExFexD: ExpertStack
  router_DxE: np.ndarray | None = None   # None: router_init decides
  shared: DenseFfn | None = None         # always-on shared expert (spec.shared_expert)
  router_repeat: int = 1                 # expert e uses router column e // router_repeat

  # Older names, still read by convert.py.
  @property
  def w_gate_ExDxF(self) -> np.ndarray:
    return self.w_gate_ExDxFe

  @property
  def w_up_ExDxF(self) -> np.ndarray:
    return self.w_up_ExDxFe

  @property
  def w_down_ExFxD(self) -> np.ndarray:
    return self.w_down_ExFexD


@dataclasses.dataclass(frozen=True)
class UpcycleSpec:
  """How one layer's dense FFN becomes experts (the config's `upcycle` section)."""
  method: str
  num_experts: int                   # E
  top_k: int                         # T (k): experts per token
  granularity: int = 1               # virtual_group: G shards per FFN
  router: str = "topk_softmax"       # the routing order the scales are computed for
  partition: str = "random"          # partition: random | kmeans
  output_scale: float | None = None  # partition: scale s on the plain sum of the k chosen
                                     # experts; None (or 0, as configs write it) = E/k
  drop_ratio: float = 0.5            # drop: fraction r of neurons re-initialised per expert
  drop_shared_indices: bool = False  # drop: one index set for gate, up and down
  noise_std: float = 0.02            # noise: std of the Gaussian added to every weight
  shared_expert: bool = False        # also return the dense FFN as a shared expert
  norm_topk_prob: bool = False       # softmax_topk: the kept probabilities are renormalised

  def validate(self, ffn_dim: int) -> None:
    """Raises ValueError, one line naming the key, for a spec that cannot apply."""
    e, g, k = self.num_experts, self.granularity, self.top_k
    if self.method not in METHODS:
      raise ValueError(f"upcycle.method={self.method!r}: expected one of {sorted(METHODS)}")
    if self.router not in ROUTERS:
      raise ValueError(f"upcycle.router={self.router!r}: expected one of {list(ROUTERS)}")
    if not isinstance(e, int) or e < 1:
      raise ValueError(f"upcycle.num_experts={e!r}: expected a positive integer")
    if not isinstance(k, int) or not 1 <= k <= e:
      raise ValueError(f"upcycle.topk={k!r}: expected 1 <= topk <= num_experts={e}")
    if not isinstance(g, int) or g < 1:
      raise ValueError(f"upcycle.granularity={g!r}: expected a positive integer")
    if self.method == "virtual_group":
      if ffn_dim % g:
        raise ValueError(f"upcycle.granularity={g} does not divide ffn_dim={ffn_dim}")
      if e % g:
        raise ValueError(f"upcycle.num_experts={e} is not a multiple of granularity={g}")
      if k % g:
        raise ValueError(f"upcycle.topk={k} is not a multiple of granularity={g}")
    elif g != 1:
      raise ValueError(f"upcycle.granularity={g}: only method 'virtual_group' splits experts")
    if self.method == "partition":
      if self.partition not in PARTITIONS:
        raise ValueError(f"upcycle.partition={self.partition!r}: expected one of "
                         f"{list(PARTITIONS)}")
      if ffn_dim % e:
        raise ValueError(f"upcycle.num_experts={e} does not divide ffn_dim={ffn_dim} (partition)")
    if self.output_scale is not None and not self.output_scale >= 0:
      raise ValueError(f"upcycle.output_scale={self.output_scale}: expected >= 0 (0 or None = E/k)")
    if not 0.0 <= self.drop_ratio <= 1.0:
      raise ValueError(f"upcycle.drop_ratio={self.drop_ratio}: expected a value in [0, 1]")
    if not self.noise_std >= 0:
      raise ValueError(f"upcycle.noise_std={self.noise_std}: expected >= 0")

  def expert_dim(self, ffn_dim: int) -> int:
    """Fe, each expert's SwiGLU width."""
    if self.method == "virtual_group":
      return ffn_dim // self.granularity
    if self.method == "partition":
      return ffn_dim // self.num_experts
    return ffn_dim

  def uniform_weight(self) -> float:
    """w0: each chosen expert's routing weight under a uniform (zero) router."""
    if self.router == "softmax_topk" and not self.norm_topk_prob:
      return 1.0 / self.num_experts
    return 1.0 / self.top_k


def _ffn_dim(dense: DenseFfn) -> int:
  return dense.w_gate_DxF.shape[1]


def _experts(gate, up, down, dense: DenseFfn, spec: UpcycleSpec, repeat: int = 1) -> ExpertFfn:
  return ExpertFfn(gate, up, down, None, dense if spec.shared_expert else None, repeat)


def _stack(w: np.ndarray, e: int) -> ExpertStack:
  """E references to one array (built on demand, no copies)."""
  return ExpertStack(e, lambda _: w, w.shape, w.dtype)


def _seeds(rng: np.random.Generator, e: int) -> np.ndarray:
  """One seed per expert, so expert e's random draws do not depend on build order."""
  return rng.integers(0, 2**63 - 1, size=e)


def copy(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """Sparse upcycling: every expert is the dense FFN. Exact at step 0 when the chosen
  weights sum to 1; for softmax_topk without renormalisation use virtual_group with
  G = 1, which adds the E/k scale."""
  del rng
  spec.validate(_ffn_dim(dense))
  e = spec.num_experts
  return _experts(*(_stack(w, e) for w in dense), dense, spec)


def virtual_group(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """Fine-grained experts (He et al. 2024): G contiguous shards of F/G neurons (gate/up
  columns with the matching down rows); expert e gets shard e mod G and router column
  e div G, so a group's G experts always score the same and, with T a multiple of G, are
  chosen together. The k chosen experts are k/G whole copies of the FFN, so their plain
  sum needs G/k: down carries a = G/(k w0), i.e. G for weights summing to 1 and E*G/T
  for softmax_topk (exact there only for a uniform router)."""
  del rng
  spec.validate(_ffn_dim(dense))
  e, g = spec.num_experts, spec.granularity
  fs = _ffn_dim(dense) // g
  shard = [slice((i % g) * fs, (i % g + 1) * fs) for i in range(e)]
  a = np.asarray(g / (spec.top_k * spec.uniform_weight()), dense.w_down_FxD.dtype)
  gate, up, down = dense
  return _experts(ExpertStack.of([gate[:, s] for s in shard]),
                  ExpertStack.of([up[:, s] for s in shard]),
                  ExpertStack.of([down[s] for s in shard]).scaled(a), dense, spec, repeat=g)


def balanced_kmeans(points_NxD: np.ndarray, k: int, rng: np.random.Generator,
                    iters: int = 25) -> np.ndarray:
  """Labels [N] with exactly N/k points per cluster: k-means whose assignment step is a
  greedy balanced assignment (router_init.kmeans with capacity N/k)."""
  n = points_NxD.shape[0]
  if n % k:
    raise ValueError(f"balanced_kmeans: {n} points do not split into {k} equal clusters")
  return router_init.kmeans(points_NxD, k, rng, iters=iters, capacity=n // k)[1]


def partition_sets(dense: DenseFfn, spec: UpcycleSpec,
                   rng: np.random.Generator) -> list[np.ndarray]:
  """E disjoint sorted neuron index sets of F/E each, covering all F neurons: a random
  permutation, or balanced k-means on the L2-normalised concatenated gate/up rows."""
  f, e = _ffn_dim(dense), spec.num_experts
  if spec.partition == "random":
    return [np.sort(s) for s in np.split(rng.permutation(f), e)]
  rows = np.concatenate([dense.w_gate_DxF.T, dense.w_up_DxF.T], axis=1).astype(np.float32)
  rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
  labels = balanced_kmeans(rows, e, rng)
  return [np.flatnonzero(labels == c) for c in range(e)]


def partition(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """LLaMA-MoE neuron partitioning: expert c holds the neurons of set c, no neuron twice.

  The scale s (`output_scale`, default E/k) multiplies the PLAIN SUM of the k chosen
  experts, so down carries s / w0 (see the module docstring). Why not E/k on the routing
  weights, as LLaMA-MoE's score_scale_factor reads: the E partitions sum to the dense FFN,
  and under a zero router with k = E every weight is 1/E, so E/k = 1 on the weights gives
  dense/E. Defined on the plain sum, E/k is exact at k = E for every router order (down
  carries E for weights summing to 1, E^2/k for softmax_topk) and, for k < E, makes the
  expected output over a uniformly random choice of k experts the dense output. To get a
  factor c on the routing weights instead, pass output_scale = c * w0."""
  spec.validate(_ffn_dim(dense))
  sets = partition_sets(dense, spec, rng)
  s = spec.output_scale or spec.num_experts / spec.top_k
  scale = np.asarray(s / spec.uniform_weight(), dense.w_down_FxD.dtype)
  gate, up, down = dense
  return _experts(ExpertStack(len(sets), lambda e: gate[:, sets[e]], (gate.shape[0], len(sets[0])),
                              gate.dtype),
                  ExpertStack(len(sets), lambda e: up[:, sets[e]], (up.shape[0], len(sets[0])),
                              up.dtype),
                  ExpertStack(len(sets), lambda e: down[sets[e]] * scale,
                              (len(sets[0]), down.shape[1]), down.dtype), dense, spec)


def drop_indices(ffn_dim: int, spec: UpcycleSpec, rng: np.random.Generator) -> np.ndarray:
  """[E, 3, round(r*F)] sorted neuron indices re-initialised in each expert's gate, up and
  down (one set for all three with drop_shared_indices). drop() draws these first from
  its rng, so the same seed gives the indices a drop() call used."""
  n = int(round(spec.drop_ratio * ffn_dim))
  idx = np.empty((spec.num_experts, 3, n), np.int64)
  for e in range(spec.num_experts):
    for m in range(3):
      idx[e, m] = idx[e, 0] if (spec.drop_shared_indices and m) else np.sort(
          rng.choice(ffn_dim, n, replace=False))
  return idx


def _redraw(w_RxC: np.ndarray, cols: np.ndarray, mu: float, sd: float,
            draw: np.random.Generator, rows_per_chunk: int = 256) -> None:
  """w[:, cols] = N(mu, sd) in place, drawn in float32 a block of rows at a time, so the
  temporaries stay small (a 2048 x 2816 float64 draw would be 46 MB per matrix)."""
  for r in range(0, w_RxC.shape[0], rows_per_chunk):
    block = draw.standard_normal((min(rows_per_chunk, w_RxC.shape[0] - r), len(cols)),
                                 dtype=np.float32)
    w_RxC[r:r + len(block), cols] = block * np.float32(sd) + np.float32(mu)


def drop(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """Drop-Upcycling (Nakamura et al. 2025): copy, then in each expert re-initialise
  round(r*F) neurons (gate/up columns, down rows) from N(mean, std) of the whole original
  matrix; a separate index set per matrix unless drop_shared_indices."""
  spec.validate(_ffn_dim(dense))
  idx = drop_indices(_ffn_dim(dense), spec, rng)
  seeds = _seeds(rng, spec.num_experts)

  def stack(m: int, orig: np.ndarray) -> ExpertStack:
    mu, sd = float(orig.mean(dtype=np.float64)), float(orig.std(dtype=np.float64))

    def build(e: int) -> np.ndarray:
      w, draw = orig.copy(), np.random.default_rng((seeds[e], m))
      _redraw(w if m < 2 else w.T, idx[e, m], mu, sd, draw)
      return w
    return ExpertStack(spec.num_experts, build, orig.shape, orig.dtype)

  return _experts(*(stack(m, w) for m, w in enumerate(dense)), dense, spec)


def noise(dense: DenseFfn, spec: UpcycleSpec, rng: np.random.Generator) -> ExpertFfn:
  """Noise upcycling: copy, plus independent N(0, noise_std) on every expert weight
  (gate, up and down; not only a selected fraction of the neurons)."""
  spec.validate(_ffn_dim(dense))
  seeds = _seeds(rng, spec.num_experts)

  def stack(m: int, w: np.ndarray) -> ExpertStack:
    build = lambda e: w + np.random.default_rng((seeds[e], m)).normal(
        0.0, spec.noise_std, w.shape).astype(w.dtype)
    return ExpertStack(spec.num_experts, build, w.shape, w.dtype)

  return _experts(*(stack(m, w) for m, w in enumerate(dense)), dense, spec)


def average_params(arrays: Sequence[np.ndarray]) -> np.ndarray:
  """BTX: the element-wise mean of one parameter over the source models (in float64,
  returned in the first source's dtype)."""
  if not len(arrays):
    raise ValueError("average_params: no sources")
  first = np.asarray(arrays[0])
  for i, a in enumerate(arrays[1:], 1):
    if np.shape(a) != first.shape:
      raise ValueError(f"average_params: source {i} has shape {np.shape(a)}, "
                       f"source 0 {first.shape}")
  return np.mean([np.asarray(a, np.float64) for a in arrays], axis=0).astype(first.dtype)


def merge_experts(denses: Sequence[DenseFfn], spec: UpcycleSpec) -> ExpertFfn:
  """BTX / mergekit-moe: expert i is dense model i's FFN (E = number of models, equal
  shapes). The shared expert, if asked for, is the sources' average FFN."""
  if len(denses) != spec.num_experts:
    raise ValueError(f"upcycle.num_experts={spec.num_experts} but {len(denses)} merge sources")
  spec.validate(_ffn_dim(denses[0]))
  shapes = [[np.shape(w) for w in d] for d in denses]
  for i, s in enumerate(shapes[1:], 1):
    if s != shapes[0]:
      raise ValueError(f"merge source {i}: FFN shapes {s} differ from source 0's {shapes[0]}")
  mean = DenseFfn(*(average_params(ws) for ws in zip(*denses)))
  return _experts(*(ExpertStack.of(ws) for ws in zip(*denses)), mean, spec)


def merge(denses: Sequence[DenseFfn], spec: UpcycleSpec,
          rng: np.random.Generator | None = None) -> ExpertFfn:
  """merge_experts with the registry's signature (`dense` is a list; rng unused)."""
  del rng
  return merge_experts(denses, spec)


def attention_experts(attns: Sequence[dict[str, np.ndarray]], shared_kv: bool
                      ) -> dict[str, np.ndarray]:
  """BAM: attention expert j is source j's attention, {'wq': [N, D, H, K], 'wk', 'wv':
  [N, D, G, K], 'wo': [N, H, K, D]}; with shared KV, 'wk' and 'wv' are the sources'
  average [D, G, K] (one KV projection) while q and o stay per expert."""
  for i, a in enumerate(attns[1:], 1):
    for name in ("wq", "wk", "wv", "wo"):
      if np.shape(a[name]) != np.shape(attns[0][name]):
        raise ValueError(f"merge source {i}: attention {name} has shape {np.shape(a[name])}, "
                         f"source 0 {np.shape(attns[0][name])}")
  out = {name: np.stack([a[name] for a in attns]) for name in ("wq", "wo")}
  for name in ("wk", "wv"):
    ws = [a[name] for a in attns]
    out[name] = average_params(ws) if shared_kv else np.stack(ws)
  return out


# bam: the FFN experts are merge's (expert j = source j's FFN); the attention experts are
# built beside them by moe_jax/upcycle/merge.py.
METHODS: dict[str, Callable[..., ExpertFfn]] = {
    "copy": copy, "virtual_group": virtual_group, "partition": partition, "drop": drop,
    "noise": noise, "merge": merge, "bam": merge}
MERGE_METHODS = ("merge", "bam")  # one dense model per expert: config.merge_sources
