"""The analyses of one MoE checkpoint: static ones layer by layer (one layer's weights in
memory at a time), then dynamic ones on a text with the intermediates captured through the
model (`moe_jax.models.llama.capture`). Returns analysis.json's dict and the arrays only
the figures need."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from moe_jax import evaluate as eval_lib
from moe_jax.analysis import dynamic, static
from moe_jax.convert import load
from moe_jax.data import corpus
from moe_jax.models import llama


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  windows: int = 8             # windows of the text for the dynamic analyses (0 = none)
  seq_len: int = 512
  batch_size: int = 2
  detail_layers: str = "auto"  # neuron reordering and PCA: auto (first, middle, last) | all | 0,5
  domain_windows: int = 2      # windows of Python code and of English prose (routing by domain)
  prompt: str = "def greet(name):\n    return f'Hello, {name}!'  # says hello"

  def __post_init__(self):
    for key in ("windows", "domain_windows"):
      if getattr(self, key) < 0:
        raise ValueError(f"config.{key}={getattr(self, key)}: expected >= 0")
    if self.seq_len < 2 or self.batch_size < 1:
      raise ValueError(f"config.seq_len={self.seq_len}, config.batch_size={self.batch_size}: "
                       "expected seq_len >= 2 and batch_size >= 1")


def detail_layers(spec: str, moe_ids: tuple[int, ...]) -> list[int]:
  if spec == "auto":
    return sorted({moe_ids[0], moe_ids[len(moe_ids) // 2], moe_ids[-1]})
  if spec == "all":
    return list(moe_ids)
  ids = [int(s) for s in spec.split(",") if s.strip()]
  bad = [i for i in ids if i not in moe_ids]
  if bad:
    raise ValueError(f"config.detail_layers: layer {bad[0]} is not an MoE layer {list(moe_ids)}")
  return ids


def check_reference(src: load.Source, ref: load.Source) -> None:
  """The reference must be a dense model of the same shape (the experts' source)."""
  a, b = src.cfg, ref.cfg
  same = (a.d_model, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size) == (
      b.d_model, b.n_layers, b.n_heads, b.n_kv_heads, b.vocab_size)
  if ref.is_moe or not same:
    raise ValueError(f"{ref.path}: reference is not a dense model of the checkpoint's shape "
                     f"(d_model {b.d_model} vs {a.d_model}, layers {b.n_layers} vs "
                     f"{a.n_layers}, MoE: {ref.is_moe})")


def capture(model, windows_NxL: np.ndarray, batch_size: int) -> dict[int, dict[str, np.ndarray]]:
  """Per MoE layer, the captured FFN input and routing of every token, [T, ...] numpy."""
  moe_ids = set(model.cfg.moe_layer_ids)
  parts: dict[int, dict[str, list]] = {i: {} for i in moe_ids}
  for start in range(0, len(windows_NxL), batch_size):
    _, cap = llama.capture(model, jnp.asarray(windows_NxL[start:start + batch_size]))
    for i in moe_ids:
      for k in ("ffn_input", "router_probs", "experts", "expert_weights"):
        v = np.asarray(cap[i][k])
        parts[i].setdefault(k, []).append(v.reshape(-1, v.shape[-1]))
  return {i: {k: np.concatenate(v) for k, v in d.items()} for i, d in parts.items()}


def dynamic_layer(layer: dict[tuple, np.ndarray], ref_layer, cap: dict[str, np.ndarray],
                  num_experts: int) -> dict[str, Any]:
  """One MoE layer's dynamic results from its weights and its captured tokens."""
  ffn = static.reference_ffn(ref_layer)
  dense = None if ffn is None else (ffn["w_gate"], ffn["w_up"], ffn["w_down"])
  w = static.expert_stacks(layer)
  stats = dynamic.expert_output_stats(cap["ffn_input"], w["w_gate"], w["w_up"], w["w_down"],
                                      dense=dense)
  scores, load_e = cap["router_probs"], dynamic.expert_load(cap["experts"], num_experts)
  out = {"output_cosine": stats["cosine"].tolist(), "output_angular": stats["angular"].tolist(),
         "norm_score_counts": dynamic.rank_cooccurrence(stats["norms"], scores).tolist(),
         "top1_max_norm_fraction": dynamic.top1_max_norm_fraction(stats["norms"], scores),
         "load": load_e.tolist(), "load_entropy": dynamic.load_entropy(load_e),
         "active_fraction": stats["active"].tolist()}
  if dense is not None:
    out["output_to_reference"] = stats["dense_cosine"].tolist()
  return out


def domain_pass(model, tok, cfg: AnalysisConfig) -> dict[int, dict[str, Any]]:
  """Per MoE layer, the expert loads on Python code and on English prose, and their
  Jensen-Shannon divergence."""
  texts = {"code": "\n".join(corpus.stdlib_documents("valid")),
           "prose": corpus.embedded_eval_text()}
  e, loads = model.cfg.moe.num_experts, {}
  for name, text in texts.items():
    windows = eval_lib.make_windows(tok.encode(text), cfg.seq_len, cfg.domain_windows, name)
    loads[name] = {i: dynamic.expert_load(c["experts"], e)
                   for i, c in capture(model, windows, cfg.batch_size).items()}
  return {i: {"domain_loads": {n: loads[n][i].tolist() for n in texts},
              "domain_js": dynamic.js_divergence(loads["code"][i], loads["prose"][i])}
          for i in model.cfg.moe_layer_ids}


def prompt_routing(model, tok, prompt: str, shown: list[int]) -> dict[str, Any]:
  """The combine weight of every expert for each token of `prompt`, in the shown layers."""
  ids = tok.encode(prompt)
  _, cap = llama.capture(model, jnp.asarray([ids]))
  e = model.cfg.moe.num_experts
  weights = {}
  for i in shown:
    experts, w = np.asarray(cap[i]["experts"][0]), np.asarray(cap[i]["expert_weights"][0])
    dense_LxE = np.zeros((len(ids), e))
    np.put_along_axis(dense_LxE, experts, w, axis=1)
    weights[i] = dense_LxE
  return {"tokens": [tok.decode([t]) for t in ids], "weights": weights}


def _captures(src: load.Source, tok, windows_NxL, cfg: AnalysisConfig, shown: list[int]):
  """What the dynamic analyses need from running the model, after which it is freed:
  the captured layers on the text, the loads by domain, a prompt's routing."""
  model = src.model(moe=dataclasses.replace(src.cfg.moe, backend="dropless"))
  cap = capture(model, windows_NxL, cfg.batch_size)
  domains = domain_pass(model, tok, cfg) if cfg.domain_windows else {}
  return cap, domains, prompt_routing(model, tok, cfg.prompt, shown)


def analyze(src: load.Source, ref: load.Source | None, text: str, cfg: AnalysisConfig,
            text_name: str = "analysis text"):
  """(analysis.json's dict, figure-only arrays) for the MoE checkpoint `src`: the model
  runs once on the text (when cfg.windows), then each MoE layer's weights are read,
  analysed and dropped in turn."""
  if not src.is_moe:
    raise ValueError(f"{src.path}: not an MoE checkpoint (no MoE layers); expected one to "
                     "analyse")
  if ref is not None:
    check_reference(src, ref)
  shown = detail_layers(cfg.detail_layers, src.cfg.moe_layer_ids)
  cap, domains, extra = {}, {}, {"pca": {}, "shown_layers": shown}
  if cfg.windows:  # a text too short fails before any work
    tok = src.tokenizer()
    windows = eval_lib.make_windows(tok.encode(text), cfg.seq_len, cfg.windows, text_name)
    cap, domains, extra["prompt_routing"] = _captures(src, tok, windows, cfg, shown)
  e = src.cfg.moe.num_experts
  result = {"checkpoint": src.path, "kind": src.kind, "reference": ref.path if ref else None,
            "num_experts": e, "tokens": int(windows.size) if cfg.windows else 0, "layers": {}}
  for i in src.cfg.moe_layer_ids:
    layer, ref_layer = src.layer(i), ref.layer(i) if ref else None
    out = static.analyse_layer(layer, ref_layer, reorder=i in shown, with_pca=i in shown)
    if "_pca" in out:
      extra["pca"][i] = out.pop("_pca")
    if i in cap:
      out.update(dynamic_layer(layer, ref_layer, cap[i], e), **domains.get(i, {}))
    result["layers"][str(i)] = out
    del layer, ref_layer  # before the next layer is read: one layer in memory at a time
  if cap:
    agree = dynamic.layer_agreement({i: c["experts"] for i, c in cap.items()})
    dyn = [result["layers"][str(i)] for i in cap]
    result.update(consecutive_layers=[{"layers": list(k), **v} for k, v in agree.items()],
                  norm_score_counts_total=np.sum([d["norm_score_counts"] for d in dyn],
                                                 axis=0).tolist(),
                  top1_max_norm_fraction_mean=float(np.mean(
                      [d["top1_max_norm_fraction"] for d in dyn])))
  return result, extra


def reference_from_provenance(meta: dict[str, Any]) -> str | None:
  """The dense checkpoint an MoE's experts were upcycled from, followed back through
  its provenance (an upcycle, or a chain of train runs); None if it was never dense or
  was merged from several (merge, bam: no one model is every expert's base)."""
  prov = meta.get("provenance") or {}
  while prov:
    init = prov.get("init") or {}
    if len(prov.get("merge_sources") or ()) > 1:  # merge, bam: one dense model per expert
      return None
    if prov.get("upcycle"):
      return init.get("source") if init.get("source") != "scratch" else None
    prov = init.get("provenance") or {}
  return None
