"""One entry point for every checkpoint a user can name.

`open_source(path)` decides once what `path` is and reads its config (a GGUF header is
parsed once): a GGUF file, a Hugging Face directory, a moe_jax checkpoint directory, a
train workdir (its latest finished step) or one step of it (`<workdir>/checkpoints/<N>`).
The `Source` it returns builds the model, the tokenizer or an HF-named tensor stream.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from moe_jax import checkpoint
from moe_jax import sharding
from moe_jax import tokenizer as tokenizer_lib
from moe_jax.config import ModelConfig
from moe_jax.convert import assemble, gguf, hf, hf_names
from moe_jax.models import llama
from moe_jax.train import checkpoints as train_ckpt

EMBEDDED = "embedded:SmolLM2-135M-Instruct"


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved checkpoint. `path` is the file or directory read (for a train run, the
  step directory); `meta` holds the moe_jax provenance (empty for HF and GGUF)."""
  kind: str                              # gguf | hf | moe_jax | train
  path: str
  cfg: ModelConfig
  meta: dict[str, Any]
  header: gguf.GgufFile | None = None    # a GGUF's parsed header

  @property
  def is_moe(self) -> bool:
    return self.cfg.moe is not None

  @property
  def tokenizer_dir(self) -> str:
    return train_ckpt.workdir_of(self.path) if self.kind == "train" else self.path

  def has_tokenizer(self) -> bool:
    return self.kind == "gguf" or os.path.isfile(os.path.join(self.tokenizer_dir,
                                                              "tokenizer.json"))

  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    if self.kind == "gguf":
      return tokenizer_lib.tokenizer_from_gguf(self.header.fields, self.path)
    return tokenizer_lib.tokenizer_from_hf_dir(self.tokenizer_dir)

  def model(self, mesh: jax.sharding.Mesh | None = None, **overrides) -> llama.Transformer:
    """The model, its params placed (sharded over `mesh` when given) as they are read.
    `overrides` replace ModelConfig fields (dtype="bfloat16", moe=...)."""
    cfg = self.cfg.replace(**overrides)
    if self.kind == "moe_jax":
      return checkpoint.load(self.path, mesh, **overrides)
    if self.kind == "train":
      graphdef, state = nnx.split(llama.abstract(cfg))
      pure = train_ckpt.restore_model(self.path, sharding.abstract_arrays(state, mesh))
      nnx.replace_by_pure_dict(state, pure)
      return nnx.merge(graphdef, state)
    return assemble.model_from_tensors(cfg, self.tensors(), mesh)

  def tensors(self) -> Iterator[tuple[str, np.ndarray, str]]:
    """(HF name, float32 array, file) one tensor at a time: streamed from GGUF and
    safetensors, from the loaded model for moe_jax and train checkpoints."""
    if self.kind == "gguf":
      return finite_tensors((n, w, self.path)
                            for n, w in gguf.iter_gguf_tensors(self.path, self.header))
    if self.kind == "hf":
      return finite_tensors(hf.iter_safetensors(self.path))
    return _model_tensors(self.model(), self.path)

  def layer(self, i: int) -> dict[tuple, np.ndarray]:
    """Layer `i`'s params as {path below the layer: float32 array} (experts stacked
    [E, ...]), read without the rest of the model: for layer-by-layer analyses."""
    if not 0 <= i < self.cfg.n_layers:
      raise ValueError(f"{self.path}: layer {i} out of range (the model has "
                       f"{self.cfg.n_layers} layers)")
    flat = self._read(lambda p: p[:2] == ("layers", i), f"layer_{i:03d}",
                      f"model.layers.{i}.", f"blk.{i}.")
    return {p[2:]: v for p, v in flat.items()}

  def root(self) -> dict[tuple, np.ndarray]:
    """The params outside the layers (embeddings, final norm, untied head) as {path:
    float32 array}, read without the layers."""
    return self._read(lambda p: p[0] != "layers", "root",
                      ("model.embed_tokens.", "model.norm.", "lm_head."),
                      ("token_embd.", "output_norm.", "output."))

  def _read(self, keep, scope: str, hf_prefix, gguf_prefix) -> dict[tuple, np.ndarray]:
    """The params whose paths `keep` selects, read from this source's `scope` item (moe_jax)
    or its tensors named with the prefixes (HF, GGUF), as float32 host arrays."""
    target = {p: t for p, t in _abstract_flat(self.cfg).items() if keep(p)}
    host = {p: np.empty(t.shape, t.dtype) for p, t in target.items()}  # read to the host
    if self.kind == "moe_jax":
      flat = checkpoint.restore_flat(self.path, host, scopes={scope})
    elif self.kind == "train":
      flat = traverse_util.flatten_dict(
          train_ckpt.restore_model(self.path, traverse_util.unflatten_dict(host)))
    elif self.kind == "hf":
      flat = _from_hf(self.cfg, finite_tensors(hf.iter_safetensors(self.path, hf_prefix)),
                      target)
    else:
      tensors = gguf.iter_gguf_tensors(self.path, self.header, gguf_prefix)
      flat = _from_hf(self.cfg, finite_tensors((n, w, self.path) for n, w in tensors), target)
    return {p: np.asarray(v, np.float32) for p, v in flat.items()}

  def sha256(self) -> str:
    return sha256_path(self.path)

  def describe(self) -> dict[str, Any]:
    """Provenance of this source as an init: where, what, its hash and its own history."""
    out = {"source": self.path, "kind": self.kind, "sha256": self.sha256()}
    if self.meta.get("provenance"):
      out["provenance"] = self.meta["provenance"]
    for key in ("step", "tokens_seen"):
      if key in self.meta:
        out[key] = self.meta[key]
    return out


ALLOW_NONFINITE = "MOE_JAX_ALLOW_NONFINITE"  # =1: import NaN/Inf weights (debugging)


def finite_tensors(tensors: Iterator[tuple[str, np.ndarray, str]]
                   ) -> Iterator[tuple[str, np.ndarray, str]]:
  """The (name, array, file) stream, refusing in one line the first tensor holding a NaN
  or an Inf, unless the environment sets MOE_JAX_ALLOW_NONFINITE=1."""
  check = os.environ.get(ALLOW_NONFINITE) != "1"
  for name, w, source in tensors:
    if check and not np.isfinite(w).all():
      bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
      raise ValueError(f"{source}: tensor {name} holds {bad} NaN or Inf value(s); expected "
                       f"finite weights (set {ALLOW_NONFINITE}=1 to import it anyway)")
    yield name, w, source


def _model_tensors(model: llama.Transformer, source: str):
  params = ((p, np.asarray(v.get_value(), np.float32))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  return ((name, w, source) for name, w in hf_names.param_tensors(model.cfg, params))


@functools.lru_cache(maxsize=4)
def _abstract_flat(cfg: ModelConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
  """Every param's shape and dtype (single device), traced once per config."""
  return traverse_util.flatten_dict(
      sharding.abstract_arrays(nnx.state(llama.abstract(cfg)), None))


def _from_hf(cfg: ModelConfig, tensors, target: dict[tuple, Any]) -> dict[tuple, np.ndarray]:
  """The params of `target` from a stream of HF-named tensors (experts stacked)."""
  out: dict[tuple, np.ndarray] = {}
  source = "checkpoint"
  for name, w, source in tensors:
    m = hf_names.match_stream(cfg, name, source)
    if m is None or m.path not in target:
      continue
    if m.expert is None:
      out[m.path] = m.rule.to_ours(w)
    else:
      out.setdefault(m.path, np.zeros(target[m.path].shape, np.float32))[m.expert] = (
          m.rule.to_ours(w))
  missing = sorted(set(target) - set(out), key=str)
  if missing:
    raise ValueError(f"{source}: missing tensor {'/'.join(map(str, missing[0]))}")
  return out


def kind_of(path: str) -> str:
  """'gguf', 'hf', 'moe_jax' or 'train'; a one-line error naming the path otherwise."""
  if not os.path.exists(path):
    if train_ckpt.is_step_dir(path):
      train_ckpt.resolve(path)  # says whether the step is being written or absent
    raise FileNotFoundError(f"{path}: checkpoint not found")
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return "gguf"
    raise ValueError(f"{path}: expected a .gguf file or a checkpoint directory")
  if checkpoint.is_checkpoint(path):
    return "moe_jax"
  if train_ckpt.is_workdir(path) or train_ckpt.is_step_dir(path):
    return "train"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise ValueError(f"{path}: expected a Hugging Face directory (config.json + safetensors), "
                   f"a moe_jax checkpoint ({checkpoint.MARKER}), a train workdir "
                   f"({train_ckpt.CHECKPOINTS}/<step>) or a .gguf file")


def open_source(path: str = "") -> Source:
  """The checkpoint `path` names ('' = the embedded SmolLM2-135M-Instruct GGUF)."""
  path = os.path.abspath(path) if path else gguf.embedded_gguf_path()
  kind = kind_of(path)
  if kind == "gguf":
    header = gguf.open_reader(path)
    return Source(kind, path, hf.config_from_hf(gguf.read_gguf_config(path, header), path),
                  {}, header)
  if kind == "hf":
    return Source(kind, path, hf.read_hf_config(path), {})
  if kind == "train":
    path = train_ckpt.resolve(path)
    meta = train_ckpt.read_meta(path)
  else:
    meta = checkpoint.read_meta(path)
  if "model" not in meta:
    raise ValueError(f"{path}: checkpoint metadata has no 'model' config")
  return Source(kind, path, ModelConfig.from_dict(meta["model"]), meta)


def read_config(path: str, **overrides) -> ModelConfig:
  return open_source(path).cfg.replace(**overrides)


def load_model(path: str = "", mesh: jax.sharding.Mesh | None = None, **overrides
               ) -> tuple[llama.Transformer, tokenizer_lib.Tokenizer | None]:
  """Model and tokenizer (None if the checkpoint has none) of `path`; `overrides`
  replace ModelConfig fields (e.g. dtype="bfloat16")."""
  src = open_source(path)
  return src.model(mesh, **overrides), (src.tokenizer() if src.has_tokenizer() else None)


def load_tokenizer(path: str = "") -> tokenizer_lib.Tokenizer:
  return open_source(path).tokenizer()


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, stamp: tuple) -> str:
  del stamp  # part of the cache key only
  h = hashlib.sha256()
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
  for f in files:
    if os.path.isdir(path):
      h.update(os.path.relpath(f, path).encode() + b"\0")
    with open(f, "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 24), b""):
        h.update(chunk)
  return h.hexdigest()


def sha256_path(path: str) -> str:
  """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
  files = [path] if os.path.isfile(path) else [
      os.path.join(r, f) for r, _, names in os.walk(path) for f in names]
  stamp = tuple(sorted((f, os.path.getsize(f), os.path.getmtime(f)) for f in files))
  return _sha256_cached(os.path.abspath(path), stamp)
