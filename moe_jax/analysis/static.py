"""The weight-only analyses of one MoE layer, from its params and, when known, the dense
layer its experts came from (the reference). One layer is in memory at a time.

A layer is {path below the layer: array} as `load.Source.layer(i)` returns it. When the
experts are narrower than the reference FFN (virtual groups, partition), each expert is
compared with its matching shard of the reference: the reference neurons its own neurons
match best (a maximising assignment), which recovers the shard whatever its layout.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize

from moe_jax.analysis import distance, neurons, pca, router, weights

MATS = {"w_gate": -1, "w_up": -1, "w_down": 1}   # neuron axis of each [E, ...] expert stack


def expert_stacks(layer: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
  return {m: layer[("mlp", m)] for m in MATS}


def reference_ffn(ref_layer: dict[tuple, np.ndarray] | None) -> dict[str, np.ndarray] | None:
  """The dense FFN of the reference layer ([D, F], [D, F], [F, D]); None without one."""
  if ref_layer is None:
    return None
  ffn = {m: ref_layer[("mlp", m)] for m in MATS}
  if ffn["w_gate"].ndim != 2:
    raise ValueError("reference: layer FFN is not dense (expected a dense model)")
  return ffn


def matched_shards(stacks: dict[str, np.ndarray], ffn: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
  """Per matrix, [E, ...] the reference shard matching each expert: the whole FFN when
  the widths agree, else the reference neurons assigned to the expert's neurons."""
  e, _, fe = stacks["w_gate"].shape
  if fe == ffn["w_gate"].shape[1]:
    return {m: np.broadcast_to(ffn[m], stacks[m].shape) for m in MATS}
  dense_NxP = neurons.dense_neurons(ffn["w_gate"], ffn["w_up"], ffn["w_down"])
  ex_ExFxP = neurons.expert_neurons(stacks["w_gate"], stacks["w_up"], stacks["w_down"])
  idx_ExF = np.stack([optimize.linear_sum_assignment(
      -neurons.neuron_cosine(ex_ExFxP[i], dense_NxP))[1] for i in range(e)])
  return {"w_gate": ffn["w_gate"][:, idx_ExF].transpose(1, 0, 2),
          "w_up": ffn["w_up"][:, idx_ExF].transpose(1, 0, 2),
          "w_down": ffn["w_down"][idx_ExF]}


def _with_shards(w_ExAxB: np.ndarray, shards_ExAxB: np.ndarray | None) -> np.ndarray:
  """[E (+1), E (+1)] weight cosine, the reference LAST: expert e against its shard."""
  cos = weights.weight_cosine(w_ExAxB)
  if shards_ExAxB is None:
    return cos
  e = len(w_ExAxB)
  to_ref = np.array([distance.to_base(w_ExAxB[i], shards_ExAxB[i])["cosine"] for i in range(e)])
  out = np.ones((e + 1, e + 1))
  out[:e, :e], out[:e, e], out[e, :e] = cos, to_ref, to_ref
  return out


def analyse_layer(layer: dict[tuple, np.ndarray], ref_layer: dict[tuple, np.ndarray] | None,
                  *, reorder: bool = False, with_pca: bool = False) -> dict[str, Any]:
  """The static analyses of one MoE layer, JSON-ready (lists), plus '_pca' arrays for the
  figures when `with_pca`. `reorder` adds the neuron reordering (an F x F assignment
  per expert pair, the costly one)."""
  stacks, ffn = expert_stacks(layer), reference_ffn(ref_layer)
  shards = matched_shards(stacks, ffn) if ffn is not None else None
  e = len(stacks["w_gate"])
  out: dict[str, Any] = {"num_experts": e, "has_reference": ffn is not None}
  wcos = {m: _with_shards(stacks[m], None if shards is None else shards[m]) for m in MATS}
  out["weight_cosine"] = {m: c.tolist() for m, c in wcos.items()}
  out["neuron_averaged"] = {m: neurons.averaged_cosine(stacks[m], ax).tolist()
                            for m, ax in MATS.items()}
  rcos = router.router_cosine(layer[("mlp", "router")])
  out["router_cosine"] = rcos.tolist()
  out["router_fit"] = {m: router.router_fit(rcos, c[:e, :e]) for m, c in wcos.items()}
  if ref_layer is not None:
    out["to_base"] = _to_base(layer, ref_layer, stacks, shards)
  if reorder or with_pca:
    ex_ExFxP = neurons.expert_neurons(stacks["w_gate"], stacks["w_up"], stacks["w_down"])
    if reorder:
      pairs = neurons.pairwise_reordered(ex_ExFxP)
      out["neuron_reordered"] = {k: np.asarray(pairs[k]).tolist()
                                 for k in ("cosine", "kendall_tau")}
    if with_pca:
      out["_pca"] = _pca(stacks, shards, ex_ExFxP)
  return out


def _to_base(layer, ref_layer, stacks, shards) -> dict[str, dict[str, Any]]:
  """{'cosine': {group: value}, 'rel_l2': {...}}: experts (per expert) against their
  shard of the reference FFN, every other param against the same reference param."""
  out: dict[str, dict[str, Any]] = {"cosine": {}, "rel_l2": {}}
  for m in MATS:
    d = [distance.to_base(stacks[m][i], shards[m][i]) for i in range(len(stacks[m]))]
    out["cosine"][f"mlp.{m}"] = [x["cosine"] for x in d]
    out["rel_l2"][f"mlp.{m}"] = [x["rel_l2"] for x in d]
  for path, w in layer.items():
    if path[0] == "mlp" or path not in ref_layer or ref_layer[path].shape != w.shape:
      continue
    d = distance.to_base(w, ref_layer[path])
    out["cosine"][".".join(path)], out["rel_l2"][".".join(path)] = d["cosine"], d["rel_l2"]
  return out


def expert_cosine_to_base(layer: dict[tuple, np.ndarray],
                          ref_layer: dict[tuple, np.ndarray]) -> float:
  """The mean cosine of every expert matrix (gate, up, down) to its shard of the
  reference FFN: 1 for copied experts, lower the further training (or the init) moved."""
  stacks = expert_stacks(layer)
  shards = matched_shards(stacks, reference_ffn(ref_layer))
  return float(np.mean([distance.to_base(stacks[m][i], shards[m][i])["cosine"]
                        for m in MATS for i in range(len(stacks[m]))]))


def _pca(stacks, shards, ex_ExFxP) -> dict[str, Any]:
  """2-D PCA of the experts (one point per expert matrix, the reference LAST when known)
  and of all experts' neurons (labelled by expert)."""
  out = {}
  for m in MATS:
    ref = None if shards is None or shards[m][0].shape != stacks[m][0].shape else shards[m][0]
    coords, ratio = pca.pca_2d(pca.expert_points(stacks[m], ref))
    out[m] = {"coords": coords, "ratio": ratio, "has_reference": ref is not None}
  pts, labels = pca.neuron_points(ex_ExFxP)
  coords, ratio = pca.pca_2d(pts)
  out["neurons"] = {"coords": coords, "ratio": ratio, "labels": labels}
  return out
