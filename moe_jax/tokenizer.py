"""Tokenizers that come with a checkpoint (tokenizer.json, or a GGUF's own vocabulary), and
a byte-level BPE trained here for models trained from scratch.

A thin wrapper over `tokenizers.Tokenizer` (transformers is not needed). `encode`
never adds special tokens: perplexity and packing decide where BOS/EOS go.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

_CONTROL = 3  # llama.cpp token type of special tokens
END_OF_TEXT = "<|endoftext|>"  # a trained BPE's one special token (id 0), its EOS


class Tokenizer:
  """encode/decode plus the ids a training pipeline needs."""

  def __init__(self, tok: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None):
    self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """encode of each text, the texts tokenised in parallel (tokenizers' Rust threads)."""
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=False)

  def save(self, path: str) -> None:
    self.tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump({"bos_token_id": self.bos_id, "eos_token_id": self.eos_id}, f)


def _special_id(tok: tokenizers.Tokenizer, cfg: dict, key: str) -> int | None:
  value = cfg.get(f"{key}_token_id")
  if value is None and isinstance(cfg.get(f"{key}_token"), (str, dict)):
    token = cfg[f"{key}_token"]
    value = tok.token_to_id(token["content"] if isinstance(token, dict) else token)
  return value[0] if isinstance(value, list) else value


def tokenizer_from_hf_dir(path: str) -> Tokenizer:
  """tokenizer.json, with BOS/EOS ids from tokenizer_config.json or config.json."""
  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file}: tokenizer not found")
  tok = tokenizers.Tokenizer.from_file(file)
  ids = {}
  for name in ("tokenizer_config.json", "config.json"):
    cfg_file = os.path.join(path, name)
    if os.path.isfile(cfg_file):
      with open(cfg_file) as f:
        cfg = json.load(f)
      for key in ("bos", "eos"):
        if ids.get(key) is None:
          ids[key] = _special_id(tok, cfg, key)
  return Tokenizer(tok, ids.get("bos"), ids.get("eos"))


def tokenizer_from_gguf(fields: dict, path: str) -> Tokenizer:
  """Byte-level BPE from a GGUF's `tokenizer.ggml.*` metadata (tokenizer model 'gpt2');
  `fields` is the parsed header's metadata, `path` names the file in errors."""
  field = fields.get
  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2'")
  tokens = field("tokenizer.ggml.tokens")
  types = field("tokenizer.ggml.token_type")
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
  tok = _byte_level(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL])
  return Tokenizer(tok, field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"))


def _byte_level(model: models.Model) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  return tok


def bpe_vocab_size(spec: str, key: str = "config.scratch.tokenizer") -> int | None:
  """'bpe:N' -> N (None for ''), N large enough for the 256 bytes and END_OF_TEXT."""
  if not spec:
    return None
  kind, _, n = spec.partition(":")
  least = len(pre_tokenizers.ByteLevel.alphabet()) + 1
  if kind != "bpe" or not n.isdigit() or int(n) < least:
    raise ValueError(f"{key}={spec!r}: expected '' (the embedded model's vocabulary) or "
                     f"'bpe:N' with N >= {least}")
  return int(n)


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
  """A byte-level BPE of `vocab_size` tokens learned from `texts` (deterministic: the same
  texts give the same merges in any process). Every byte is a token, so any text encodes."""
  tok = _byte_level(models.BPE())
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer, length=len(texts))
  return Tokenizer(tok, None, tok.token_to_id(END_OF_TEXT))
