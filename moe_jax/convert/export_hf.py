"""Export an MoE model to Hugging Face formats: Mixtral, Qwen2-MoE, Qwen3-MoE.

What a format cannot express is refused up front with one line; routing is mapped to
each format's semantics, and `topk_scaling_factor` is folded into the down projections.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import save_file

from moe_jax import checkpoint, errors
from moe_jax.config import ModelConfig
from moe_jax.convert import hf_names, load

FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe")
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}


def check_exportable(cfg: ModelConfig, fmt: str) -> None:
  """Raises ValueError (one line) if `fmt` cannot represent `cfg` exactly."""
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: expected one of {FORMATS}")
  if cfg.moa is not None:
    raise ValueError(f"format {fmt}: the model has attention experts (BAM), which no Hugging "
                     "Face format represents; evaluate and train it with moe_jax")
  if cfg.block != "sequential":
    raise ValueError(f"format {fmt}: the model has {cfg.block} blocks; the Llama-family "
                     "formats are sequential (attention, then FFN)")
  moe = cfg.moe
  if moe is None:
    raise ValueError(f"format {fmt}: the model has no MoE layers (export a dense model as-is)")
  if moe.router not in ("topk_softmax", "softmax_topk"):
    raise ValueError(f"format {fmt}: router {moe.router!r} has no equivalent (topk_softmax or "
                     "softmax_topk only)")
  renorm = _renormalised(cfg)
  problems = []
  if fmt == "mixtral":
    if not renorm:
      problems.append("Mixtral renormalises the top-k weights; this router does not")
    if set(cfg.moe_layer_ids) != set(range(cfg.n_layers)):
      problems.append("Mixtral needs every layer to be MoE")
    if moe.shared_expert_dim:
      problems.append("Mixtral has no shared expert")
    if cfg.qkv_bias or cfg.qk_norm:
      problems.append("Mixtral attention has no q/k/v bias or q/k norm")
  if fmt.startswith("qwen") and cfg.sliding_window is not None:
    problems.append("sliding-window attention is not exported to Qwen formats")
  if fmt == "qwen2_moe":
    if cfg.qk_norm:
      problems.append("Qwen2-MoE attention has no q/k norm")
    if moe.shared_expert_dim and not moe.shared_expert_gate:
      problems.append("Qwen2-MoE gates its shared expert with a sigmoid; this one is ungated")
  if fmt == "qwen3_moe":
    if not cfg.qk_norm:
      problems.append("Qwen3-MoE attention always applies q/k RMSNorm; this model has none")
    if cfg.qkv_bias:
      problems.append("Qwen3-MoE attention bias would add an o_proj bias; not supported")
    if moe.shared_expert_dim:
      problems.append("Qwen3-MoE has no shared expert")
  if problems:
    raise ValueError(f"format {fmt} cannot represent this model: {'; '.join(problems)}")


def _renormalised(cfg: ModelConfig) -> bool:
  return cfg.moe.router == "topk_softmax" or cfg.moe.norm_topk_prob


def hf_config(cfg: ModelConfig, fmt: str) -> dict[str, Any]:
  """config.json for `fmt`, assuming `check_exportable` passed."""
  moe = cfg.moe
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope.update({k: v for k, v in vars(cfg.rope_scaling).items()})
  out = {
      "architectures": [_ARCHITECTURES[fmt]], "model_type": fmt,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "hidden_act": "silu", "rms_norm_eps": cfg.rms_eps, "rope_parameters": rope,
      "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
      "tie_word_embeddings": cfg.tie_embeddings, "num_experts_per_tok": moe.top_k,
      "output_router_logits": False, "router_aux_loss_coef": moe.aux_loss_coeff,
      "dtype": "float32",
  }
  if fmt == "mixtral":
    out.update(num_local_experts=moe.num_experts, intermediate_size=moe.expert_dim,
               sliding_window=cfg.sliding_window)
  else:
    moe_ids = set(cfg.moe_layer_ids)
    out.update(num_experts=moe.num_experts, moe_intermediate_size=moe.expert_dim,
               intermediate_size=cfg.ffn_dim, norm_topk_prob=_renormalised(cfg),
               decoder_sparse_step=1, use_sliding_window=False,
               mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_ids])
  if fmt == "qwen2_moe":
    out.update(shared_expert_intermediate_size=moe.shared_expert_dim or moe.expert_dim,
               qkv_bias=True)
  if fmt == "qwen3_moe":
    out.update(attention_bias=False)
  return out


def hf_tensors(model, fmt: str) -> dict[str, np.ndarray]:
  """All params as HF-named, HF-layout float32 arrays."""
  cfg = model.cfg.replace(arch=fmt)
  params = ((path, _folded(cfg, path, np.asarray(var.get_value(), np.float32)))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = dict(hf_names.param_tensors(cfg, params))
  if fmt == "qwen2_moe":
    _fill_qwen2_defaults(cfg, out)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _folded(cfg: ModelConfig, path, w: np.ndarray) -> np.ndarray:
  """The routing scale folded into an MoE layer's expert down projections."""
  if path[-2:] == ("mlp", "w_down") and path[1] in cfg.moe_layer_ids:
    return w * cfg.moe.topk_scaling_factor
  return w


def _fill_qwen2_defaults(cfg: ModelConfig, out: dict[str, np.ndarray]) -> None:
  """Qwen2-MoE always has q/k/v biases and a shared expert: zeros are exact stand-ins."""
  d, fs = cfg.d_model, cfg.moe.shared_expert_dim or cfg.moe.expert_dim
  for i in range(cfg.n_layers):
    attn = f"model.layers.{i}.self_attn."
    for proj, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
      out.setdefault(f"{attn}{proj}_proj.bias", np.zeros(n * cfg.head_dim, np.float32))
    if i in cfg.moe_layer_ids and not cfg.moe.shared_expert_dim:
      mlp = f"model.layers.{i}.mlp."
      out[mlp + "shared_expert.gate_proj.weight"] = np.zeros((fs, d), np.float32)
      out[mlp + "shared_expert.up_proj.weight"] = np.zeros((fs, d), np.float32)
      out[mlp + "shared_expert.down_proj.weight"] = np.zeros((d, fs), np.float32)
      out[mlp + "shared_expert_gate.weight"] = np.zeros((1, d), np.float32)


def export(checkpoint_path: str, out_dir: str, fmt: str, overwrite: bool = False) -> str:
  """Writes safetensors + config.json (+ tokenizer) that transformers loads as `fmt`, from
  any MoE checkpoint the loader reads (a train workdir or step, a moe_jax directory, an
  HF MoE directory)."""
  src = load.open_source(checkpoint_path)
  check_exportable(src.cfg, fmt)
  model = src.model()
  with checkpoint.atomic_dir(out_dir, overwrite) as tmp:
    weights = os.path.join(tmp, "model.safetensors")
    try:
      save_file(hf_tensors(model, fmt), weights, metadata={"format": "pt"})
    except SafetensorError as e:  # a full disk among others
      raise OSError(f"{weights}: cannot write safetensors ({errors.one_line(e)})") from None
    checkpoint.write_json_atomic(os.path.join(tmp, "config.json"), hf_config(src.cfg, fmt))
    if src.has_tokenizer():
      src.tokenizer().save(tmp)
  return out_dir
