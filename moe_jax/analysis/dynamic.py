"""Dynamic analyses of MoE layers (Look-into-MoEs, arXiv 2406.18219): what the experts
output on real tokens, how output norms relate to router scores, how tokens are routed,
and how sparse the experts' gate activations are. Pure numpy functions.

Inputs are what `moe_jax.models.llama.capture` records for one MoE layer (its FFN input
`x_TxD`, `router_probs` [T, E], `experts` [T, K]; flatten [B, L, ...] to [T, ...]) and the
layer's expert weights in MoeBlock layout: w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD. Experts
are SwiGLU, y = (silu(x Wg) * (x Wu)) Wd, and are applied UNWEIGHTED (no router weight) to
EVERY token. They run `chunk` tokens at a time, so the working memory is O(E * chunk * F)
beyond what a function returns; the streaming statistics never hold all [E, T, D] outputs.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from scipy.special import expit

CHUNK = 512  # tokens per block of expert evaluations
EPS = 1e-12  # norms below this count as zero (cosine 0)


def _float(a) -> np.ndarray:
  """`a` as a float32 or float64 numpy array (bfloat16, float16 and ints become float32)."""
  a = np.asarray(a)
  return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
  """x * sigmoid(x), without overflow for large |x|."""
  return x * expit(x)


def swiglu(x_TxD, w_gate_DxF, w_up_DxF, w_down_FxD) -> np.ndarray:
  """[T, D] output of one SwiGLU FFN: a dense FFN, or one expert."""
  x_TxD = _float(x_TxD)
  return (silu(x_TxD @ _float(w_gate_DxF)) * (x_TxD @ _float(w_up_DxF))) @ _float(w_down_FxD)


def iter_expert_outputs(x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                        chunk: int = CHUNK) -> Iterator[np.ndarray]:
  """Every expert on every token, unweighted: yields [E, c, D] for consecutive blocks of
  c <= `chunk` tokens."""
  x_TxD = _float(x_TxD)
  wg, wu, wd = _float(w_gate_ExDxF), _float(w_up_ExDxF), _float(w_down_ExFxD)
  for start in range(0, x_TxD.shape[0], chunk):
    x_CxD = x_TxD[start:start + chunk]
    h_ExCxF = silu(x_CxD @ wg) * (x_CxD @ wu)   # [C, D] @ [E, D, F] broadcasts over E
    yield h_ExCxF @ wd


def expert_outputs(x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                   chunk: int = CHUNK) -> np.ndarray:
  """[E, T, D]: every expert applied to every token, unweighted (small inputs; the
  statistics below stream instead)."""
  return np.concatenate(list(iter_expert_outputs(x_TxD, w_gate_ExDxF, w_up_ExDxF,
                                                 w_down_ExFxD, chunk)), axis=1)


# ---- 1. Similarity of expert outputs -------------------------------------------------

def unit(v_xD: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm over the last axis; zero rows stay zero."""
  n = np.linalg.norm(v_xD, axis=-1, keepdims=True)
  return v_xD / np.where(n > EPS, n, np.inf)


def angular_similarity(cos: np.ndarray) -> np.ndarray:
  """1 - arccos(cos) / pi, in [0, 1]: 1 for the same direction, 0 for opposite."""
  return 1.0 - np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi


def token_cosines(outputs_ExTxD: np.ndarray) -> np.ndarray:
  """[T, E, E]: per token, the cosine between every pair of experts' outputs."""
  u = unit(_float(outputs_ExTxD))
  return np.einsum("etd,ftd->tef", u, u)


def output_similarity(x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                      dense: tuple | None = None, chunk: int = CHUNK) -> dict[str, np.ndarray]:
  """Token-averaged similarity between the experts' outputs on the same tokens.

  Returns "cosine" and "angular" [E, E] (the mean over tokens of each token's cosine, and
  of each token's angular similarity); with `dense` = (w_gate_DxF, w_up_DxF, w_down_FxD)
  a reference dense FFN, also "dense_cosine" and "dense_angular" [E]: each expert's output
  against the dense FFN's output on the same token."""
  x_TxD = _float(x_TxD)
  e, t = np.shape(w_gate_ExDxF)[0], x_TxD.shape[0]
  sums = {"cosine": np.zeros((e, e)), "angular": np.zeros((e, e))}
  if dense is not None:
    sums.update(dense_cosine=np.zeros(e), dense_angular=np.zeros(e))
  start = 0
  for out_ExCxD in iter_expert_outputs(x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, chunk):
    cos_CxExE = token_cosines(out_ExCxD)
    sums["cosine"] += cos_CxExE.sum(0)
    sums["angular"] += angular_similarity(cos_CxExE).sum(0)
    if dense is not None:
      ref_CxD = unit(swiglu(x_TxD[start:start + out_ExCxD.shape[1]], *dense))
      cos_ExC = np.einsum("ecd,cd->ec", unit(out_ExCxD), ref_CxD)
      sums["dense_cosine"] += cos_ExC.sum(1)
      sums["dense_angular"] += angular_similarity(cos_ExC).sum(1)
    start += out_ExCxD.shape[1]
  return {k: v / t for k, v in sums.items()}


# ---- 2. Output norm against router score ---------------------------------------------

def output_norms(x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                 chunk: int = CHUNK) -> np.ndarray:
  """[T, E]: the L2 norm of every expert's (unweighted) output on every token."""
  return np.concatenate([np.linalg.norm(o, axis=-1).T for o in iter_expert_outputs(
      x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, chunk)])


def descending_ranks(v_TxE: np.ndarray) -> np.ndarray:
  """[T, E] int: per token each expert's rank by value, 0 = largest; ties go to the lower
  expert index first."""
  order_TxE = np.argsort(-np.asarray(v_TxE), axis=-1, kind="stable")
  ranks = np.empty_like(order_TxE)
  np.put_along_axis(ranks, order_TxE, np.arange(order_TxE.shape[-1])[None], axis=-1)
  return ranks


def rank_cooccurrence(norms_TxE: np.ndarray, scores_TxE: np.ndarray) -> np.ndarray:
  """[E, E] int64: count[i, j] = number of (token, expert) pairs whose expert is ranked i
  by output norm and j by router score (0 = largest). Each row and column sums to T."""
  e = np.shape(norms_TxE)[-1]
  flat = descending_ranks(norms_TxE).ravel() * e + descending_ranks(scores_TxE).ravel()
  return np.bincount(flat, minlength=e * e).reshape(e, e).astype(np.int64)


def top1_max_norm_fraction(norms_TxE: np.ndarray, scores_TxE: np.ndarray) -> float:
  """Fraction of tokens whose top-1 router expert also has the largest output norm."""
  return float(np.mean(np.argmax(scores_TxE, -1) == np.argmax(norms_TxE, -1)))


# ---- 3. Routing ----------------------------------------------------------------------

def expert_load(experts_TxK: np.ndarray, num_experts: int) -> np.ndarray:
  """[E]: each expert's fraction of all T * K assignments (sums to 1)."""
  ids = np.asarray(experts_TxK).ravel()
  return np.bincount(ids, minlength=num_experts) / ids.size


def load_entropy(load_E: np.ndarray) -> float:
  """Entropy in bits of a load vector (log2(E) when balanced, 0 when one expert takes all)."""
  p = np.asarray(load_E, np.float64) / np.sum(load_E)
  nz = p[p > 0]
  return float(-np.sum(nz * np.log2(nz)))


def domain_loads(experts_by_domain: Mapping[str, np.ndarray],
                 num_experts: int) -> dict[str, np.ndarray]:
  """{domain: load_E}, one load vector per domain's [T, K] routed experts."""
  return {d: expert_load(x, num_experts) for d, x in experts_by_domain.items()}


def js_divergence(p_E: np.ndarray, q_E: np.ndarray) -> float:
  """Jensen-Shannon divergence in bits, in [0, 1], between two (re-normalised) load
  vectors: 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2, with 0 log 0 = 0. Equals
  scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2."""
  p = np.asarray(p_E, np.float64) / np.sum(p_E)
  q = np.asarray(q_E, np.float64) / np.sum(q_E)
  m = 0.5 * (p + q)
  kl = lambda a: float(np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0])))
  return min(max(0.5 * kl(p) + 0.5 * kl(q), 0.0), 1.0)


def js_matrix(loads_NxE: Sequence[np.ndarray]) -> np.ndarray:
  """[N, N]: js_divergence between every pair of N load vectors (e.g. domains)."""
  n = len(loads_NxE)
  return np.array([[js_divergence(loads_NxE[i], loads_NxE[j]) for j in range(n)]
                   for i in range(n)])


def same_set_fraction(experts_a_TxK: np.ndarray, experts_b_TxK: np.ndarray) -> float:
  """Fraction of tokens routed to the same set of experts (as ids) by two layers."""
  a, b = np.sort(experts_a_TxK, axis=-1), np.sort(experts_b_TxK, axis=-1)
  return float(np.mean(np.all(a == b, axis=-1)))


def same_top1_fraction(experts_a_TxK: np.ndarray, experts_b_TxK: np.ndarray) -> float:
  """Fraction of tokens with the same top-1 expert id in two layers; column 0 is the
  top-1 (moe_jax routers return the K experts in descending score order)."""
  return float(np.mean(np.asarray(experts_a_TxK)[:, 0] == np.asarray(experts_b_TxK)[:, 0]))


def layer_agreement(experts_by_layer: Mapping[int, np.ndarray]
                    ) -> dict[tuple[int, int], dict[str, float]]:
  """{(layer, next MoE layer): {"same_set": f, "same_top1": f}} over consecutive MoE layers
  (in layer order) of the same tokens."""
  ids = sorted(experts_by_layer)
  return {(a, b): {"same_set": same_set_fraction(experts_by_layer[a], experts_by_layer[b]),
                   "same_top1": same_top1_fraction(experts_by_layer[a], experts_by_layer[b])}
          for a, b in zip(ids, ids[1:])}


# ---- 4. Activation sparsity ----------------------------------------------------------

def active_fraction(x_TxD, w_gate_ExDxF, threshold: float = 1e-3,
                    experts_TxK: np.ndarray | None = None, chunk: int = CHUNK) -> np.ndarray:
  """[E]: per expert, the fraction of (token, neuron) pairs with |silu(x . w_gate)| >
  `threshold`. Over ALL tokens by default (every expert sees the same tokens); with
  `experts_TxK` only over the tokens routed to that expert (NaN for an expert none chose)."""
  x_TxD, wg = _float(x_TxD), _float(w_gate_ExDxF)
  e, f = wg.shape[0], wg.shape[-1]
  active, tokens = np.zeros(e), np.zeros(e)
  for start in range(0, x_TxD.shape[0], chunk):
    on_ExC = np.count_nonzero(np.abs(silu(x_TxD[start:start + chunk] @ wg)) > threshold, -1)
    if experts_TxK is None:
      routed_ExC = np.ones(on_ExC.shape, bool)
    else:
      chosen_CxK = np.asarray(experts_TxK)[start:start + chunk]
      routed_ExC = (chosen_CxK[None] == np.arange(e)[:, None, None]).any(-1)
    active += np.where(routed_ExC, on_ExC, 0).sum(-1)
    tokens += routed_ExC.sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(tokens > 0, active / (tokens * f), np.nan)


# ---- All of the above in one pass over the experts ------------------------------------

def expert_output_stats(x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, dense: tuple | None = None,
                        threshold: float = 1e-3, chunk: int = CHUNK) -> dict[str, np.ndarray]:
  """output_similarity's keys, plus "norms" [T, E] (output_norms) and "active" [E]
  (active_fraction over all tokens), evaluating every expert on every token once."""
  x_TxD = _float(x_TxD)
  wg, wu, wd = _float(w_gate_ExDxF), _float(w_up_ExDxF), _float(w_down_ExFxD)
  e, t, f = wg.shape[0], x_TxD.shape[0], wg.shape[-1]
  sums = {"cosine": np.zeros((e, e)), "angular": np.zeros((e, e)), "active": np.zeros(e)}
  if dense is not None:
    sums.update(dense_cosine=np.zeros(e), dense_angular=np.zeros(e))
  norms = []
  for start in range(0, t, chunk):
    x_CxD = x_TxD[start:start + chunk]
    a_ExCxF = silu(x_CxD @ wg)
    sums["active"] += np.count_nonzero(np.abs(a_ExCxF) > threshold, axis=(1, 2))
    out_ExCxD = (a_ExCxF * (x_CxD @ wu)) @ wd
    norms.append(np.linalg.norm(out_ExCxD, axis=-1).T)
    cos_CxExE = token_cosines(out_ExCxD)
    sums["cosine"] += cos_CxExE.sum(0)
    sums["angular"] += angular_similarity(cos_CxExE).sum(0)
    if dense is not None:
      cos_ExC = np.einsum("ecd,cd->ec", unit(out_ExCxD), unit(swiglu(x_CxD, *dense)))
      sums["dense_cosine"] += cos_ExC.sum(1)
      sums["dense_angular"] += angular_similarity(cos_ExC).sum(1)
  out = {k: v / t for k, v in sums.items()}
  out["active"] = sums["active"] / (t * f)
  out["norms"] = np.concatenate(norms)
  return out
