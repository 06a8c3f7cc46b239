"""Figures (PNG, matplotlib) and report.md from an analysis result (analysis.json's dict)
and the figure-only arrays (PCA points, a prompt's routing). One function per figure; each
returns (file name, one sentence on what the figure shows) or None when it has no data."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from moe_jax import plotting
from moe_jax.analysis import weights

MATS = ("w_gate", "w_up", "w_down")


def _save(fig, workdir: str, name: str) -> str:
  fig.savefig(os.path.join(workdir, name), dpi=100)
  return name


def _layer_axis(ax) -> None:
  """An x axis of layer indices: integer ticks only."""
  ax.set_xlabel("layer")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _layers(result, key: str | None = None) -> list[tuple[int, dict]]:
  """(layer, its results) in layer order; with `key`, only the layers that have it."""
  return sorted((int(i), d) for i, d in result["layers"].items() if key is None or key in d)


def weight_cosine_maps(result, extra, workdir):
  shown = [(i, d) for i, d in _layers(result) if i in extra.get("shown_layers", [])]
  if not shown:
    return None
  fig, axes = plotting.subplots(len(shown), 3, figsize=(10, 3.2 * len(shown)), squeeze=False, layout="constrained")
  for row, (i, d) in zip(axes, shown):
    for ax, m in zip(row, MATS):
      im = ax.imshow(np.asarray(d["weight_cosine"][m]), vmin=-1, vmax=1, cmap="RdBu_r")
      ax.set_title(f"layer {i} {m}", fontsize=9)
      ax.set_xlabel("expert" + (" (last: reference)" if d["has_reference"] else ""), fontsize=8)
  fig.colorbar(im, ax=axes, shrink=0.6, label="cosine")
  return _save(fig, workdir, "weight_cosine.png"), (
      "Cosine similarity between the flattened expert matrices of a few layers (the last "
      "row and column are the reference dense FFN, or each expert's matching shard of it).")


def similarity_by_layer(result, extra, workdir):
  layers = _layers(result)
  fig, ax = plotting.subplots(figsize=(7, 4), layout="constrained")
  xs = [i for i, _ in layers]
  for m in MATS:
    e = layers[0][1]["num_experts"]
    ax.plot(xs, [weights.off_diagonal_mean(np.asarray(d["weight_cosine"][m])[:e, :e])
                for _, d in layers],
            "o-", label=f"expert-expert {m}")
    if layers[0][1]["has_reference"]:
      ax.plot(xs, [float(np.mean(np.asarray(d["weight_cosine"][m])[:e, e])) for _, d in layers],
              "s--", label=f"expert-reference {m}")
  _layer_axis(ax)
  ax.set_ylabel("mean cosine")
  ax.legend(fontsize=7)
  return _save(fig, workdir, "similarity_by_layer.png"), (
      "Mean pairwise cosine between experts' weight matrices per layer (solid), and of each "
      "expert to the reference FFN (dashed).")


def router_vs_weights(result, extra, workdir):
  layers = _layers(result)
  fig, axes = plotting.subplots(1, 3, figsize=(11, 3.6), layout="constrained")
  for ax, m in zip(axes, MATS):
    xs, ys = [], []
    for _, d in layers:
      e = d["num_experts"]
      iu = np.triu_indices(e, 1)
      xs.append(np.asarray(d["weight_cosine"][m])[:e, :e][iu])
      ys.append(np.asarray(d["router_cosine"])[iu])
    ax.scatter(np.concatenate(xs), np.concatenate(ys), s=6, alpha=0.5)
    r2 = np.mean([d["router_fit"][m]["r2"] for _, d in layers])
    ax.set_title(f"{m}: mean R² over layers {r2:.2f}", fontsize=9)
    ax.set_xlabel("expert weight cosine")
    ax.set_ylabel("router column cosine")
  return _save(fig, workdir, "router_vs_weights.png"), (
      "Router-column similarity against expert-weight similarity for every expert pair of "
      "every layer; the title gives the mean R² of the per-layer linear fits.")


def pca_experts(result, extra, workdir):
  pcas = extra.get("pca", {})
  if not pcas:
    return None
  fig, axes = plotting.subplots(len(pcas), 4, figsize=(13, 3.2 * len(pcas)), squeeze=False, layout="constrained")
  for row, (i, p) in zip(axes, sorted(pcas.items())):
    for ax, m in zip(row, MATS):
      c = np.asarray(p[m]["coords"])
      e = len(c) - int(p[m]["has_reference"])
      ax.scatter(c[:e, 0], c[:e, 1], c=np.arange(e), cmap="tab10", s=40)
      if p[m]["has_reference"]:
        ax.scatter(c[e:, 0], c[e:, 1], marker="*", s=150, c="k", label="reference")
        ax.legend(fontsize=7)
      ax.set_title(f"layer {i} {m} (var {np.sum(p[m]['ratio']):.2f})", fontsize=9)
    n = p["neurons"]
    c, lab = np.asarray(n["coords"]), np.asarray(n["labels"])
    row[3].scatter(c[:, 0], c[:, 1], c=lab, cmap="tab10", s=2, alpha=0.4)
    row[3].set_title(f"layer {i} neurons by expert (var {np.sum(n['ratio']):.2f})", fontsize=9)
    for ax in row:
      ax.set_xlabel("PC 1", fontsize=8)
    row[0].set_ylabel("PC 2", fontsize=8)
  return _save(fig, workdir, "pca.png"), (
      "Two-dimensional PCA of the experts (one point per expert matrix, the star is the "
      "reference) and of all experts' neurons coloured by expert; the titles give the "
      "variance the two components explain.")


def to_base_by_layer(result, extra, workdir):
  layers = _layers(result, "to_base")
  if not layers:
    return None
  fig, axes = plotting.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
  groups = sorted({g for _, d in layers for g in d["to_base"]["cosine"]})
  for g in groups:
    xs = [i for i, d in layers if g in d["to_base"]["cosine"]]
    for ax, key in zip(axes, ("cosine", "rel_l2")):
      ax.plot(xs, [float(np.mean(d["to_base"][key][g])) for i, d in layers
                   if g in d["to_base"][key]], "o-", ms=3, label=g)
  axes[0].set_ylabel("cosine to base")
  axes[1].set_ylabel("relative L2 distance to base")
  for ax in axes:
    _layer_axis(ax)
  axes[1].legend(fontsize=6, ncol=2)
  return _save(fig, workdir, "to_base.png"), (
      "How far each parameter group of each layer has moved from the model it came from: "
      "cosine (left, experts averaged) and relative L2 distance (right).")


def output_similarity(result, extra, workdir):
  layers = _layers(result, "output_cosine")
  if not layers:
    return None
  fig, ax = plotting.subplots(figsize=(7, 4), layout="constrained")
  xs = [i for i, _ in layers]
  ax.plot(xs, [weights.off_diagonal_mean(np.asarray(d["output_cosine"])) for _, d in layers], "o-",
          label="expert-expert cosine")
  ax.plot(xs, [weights.off_diagonal_mean(np.asarray(d["output_angular"])) for _, d in layers], "s-",
          label="expert-expert angular similarity")
  if "output_to_reference" in layers[0][1]:
    ax.plot(xs, [float(np.mean(d["output_to_reference"])) for _, d in layers], "^--",
            label="expert-reference cosine")
  _layer_axis(ax)
  ax.set_ylabel("mean over tokens and pairs")
  ax.legend(fontsize=7)
  return _save(fig, workdir, "output_similarity.png"), (
      "Similarity of the experts' outputs on the same tokens (every expert applied to "
      "every token, unweighted), per layer, and of each to the reference FFN's output.")


def norm_vs_score(result, extra, workdir):
  total = result.get("norm_score_counts_total")
  if total is None:
    return None
  fig, ax = plotting.subplots(figsize=(4.8, 4), layout="constrained")
  im = ax.imshow(np.asarray(total), cmap="viridis")
  ax.set_xlabel("rank by router score")
  ax.set_ylabel("rank by output norm")
  fig.colorbar(im, ax=ax, label="count (all layers)")
  frac = result.get("top1_max_norm_fraction_mean", float("nan"))
  ax.set_title(f"top-1 expert has the largest norm: {frac:.2f}", fontsize=9)
  return _save(fig, workdir, "norm_vs_score.png"), (
      "How often an expert's rank by output norm coincides with its rank by router score, "
      "summed over layers; a heavy diagonal means the router prefers large outputs.")


def load_and_domains(result, extra, workdir):
  layers = _layers(result, "load")
  if not layers:
    return None
  fig, axes = plotting.subplots(1, 2, figsize=(11, 4), layout="constrained")
  im = axes[0].imshow(np.asarray([d["load"] for _, d in layers]).T, aspect="auto",
                      cmap="magma")
  axes[0].set_xticks(range(len(layers)), [i for i, _ in layers], fontsize=6)
  axes[0].set_xlabel("layer")
  axes[0].set_ylabel("expert")
  axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
  fig.colorbar(im, ax=axes[0], label="fraction of assignments")
  if "domain_js" in layers[0][1]:
    axes[1].bar([i for i, _ in layers], [d["domain_js"] for _, d in layers])
    axes[1].set_ylabel("JS divergence, code vs prose loads")
    _layer_axis(axes[1])
  return _save(fig, workdir, "load_and_domains.png"), (
      "Expert load per layer on the evaluation text (left) and the Jensen-Shannon "
      "divergence between the loads on Python code and on English prose (right).")


def prompt_routing(result, extra, workdir):
  prompt = extra.get("prompt_routing")
  if not prompt:
    return None
  shown = sorted(prompt["weights"])
  fig, axes = plotting.subplots(len(shown), 1, figsize=(10, 1.6 + 1.4 * len(shown)), squeeze=False, layout="constrained")
  for ax, i in zip(axes[:, 0], shown):
    ax.imshow(np.asarray(prompt["weights"][i]).T, aspect="auto", cmap="Blues")
    ax.set_ylabel(f"layer {i}\nexpert", fontsize=8)
    ax.set_xticks(range(len(prompt["tokens"])), prompt["tokens"], rotation=90, fontsize=6)
  return _save(fig, workdir, "prompt_routing.png"), (
      "The top-k experts chosen for each token of a prompt in a few layers (colour: the "
      "combine weight).")


def layer_agreement(result, extra, workdir):
  agree = result.get("consecutive_layers")
  if not agree:
    return None
  fig, ax = plotting.subplots(figsize=(7, 3.6), layout="constrained")
  pairs = [p["layers"] for p in agree]
  ax.plot(range(len(pairs)), [p["same_set"] for p in agree], "o-", label="same expert set")
  ax.plot(range(len(pairs)), [p["same_top1"] for p in agree], "s-", label="same top-1")
  ax.set_xticks(range(len(pairs)), [f"{a}-{b}" for a, b in pairs], rotation=90, fontsize=6)
  ax.set_ylabel("fraction of tokens")
  ax.legend(fontsize=7)
  return _save(fig, workdir, "layer_agreement.png"), (
      "How often a token picks the same experts (by index) in consecutive MoE layers.")


def activation_sparsity(result, extra, workdir):
  layers = _layers(result, "active_fraction")
  if not layers:
    return None
  fig, ax = plotting.subplots(figsize=(8, 3.6), layout="constrained")
  im = ax.imshow(np.asarray([d["active_fraction"] for _, d in layers]).T, aspect="auto",
                 cmap="viridis", vmin=0, vmax=1)
  ax.set_xticks(range(len(layers)), [i for i, _ in layers], fontsize=6)
  ax.set_xlabel("layer")
  ax.set_ylabel("expert")
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  fig.colorbar(im, ax=ax, label="fraction |silu(x W_gate)| > 1e-3")
  return _save(fig, workdir, "activation_sparsity.png"), (
      "The fraction of each expert's hidden activations above 1e-3 in magnitude.")


FIGURES = (weight_cosine_maps, similarity_by_layer, router_vs_weights, pca_experts,
           to_base_by_layer, output_similarity, norm_vs_score, load_and_domains,
           prompt_routing, layer_agreement, activation_sparsity)


def write(result: dict[str, Any], extra: dict[str, Any], workdir: str) -> list[str]:
  """Every figure that has data, then report.md embedding each with its sentence."""
  made = [f(result, extra, workdir) for f in FIGURES]
  made = [m for m in made if m is not None]
  lines = [f"# What the experts learned: {result['checkpoint']}", ""]
  if result.get("reference"):
    lines += [f"Reference (dense model the experts came from): `{result['reference']}`.", ""]
  lines += [f"{len(result['layers'])} MoE layers, {result['num_experts']} experts each; "
            f"dynamic analyses on {result.get('tokens', 0)} tokens.", ""]
  for name, sentence in made:
    lines += [f"![{name}]({name})", "", sentence, ""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return [name for name, _ in made]
