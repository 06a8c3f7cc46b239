"""grain input pipeline: tokenise, shuffle by seed, pack into fixed-length rows.

A packed row of `seq_len + 1` tokens carries segment ids and positions; `to_batch`
turns it into inputs, next-token targets and a loss mask that never crosses documents.
The iterator's state (grain's own) goes into training checkpoints.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp


def tokenize_documents(docs: Sequence[str],
                       encode_batch: Callable[[Sequence[str]], list[list[int]]],
                       eos_id: int | None) -> list[np.ndarray]:
  """Token arrays, each document followed by EOS when the tokenizer has one."""
  out = []
  for ids in encode_batch(docs):
    ids = list(ids) + ([eos_id] if eos_id is not None else [])
    if ids:
      out.append(np.asarray(ids, np.int32))
  return out


def packed_dataset(token_docs: Sequence[np.ndarray], seq_len: int, batch_size: int, seed: int,
                   *, shard_index: int = 0, shard_count: int = 1,
                   num_epochs: int | None = None, drop_remainder: bool = True
                   ) -> grain.IterDataset:
  """Infinite (or `num_epochs`) stream of [batch_size // shard_count, seq_len + 1] packed
  rows: shard `shard_index`'s contiguous slice of every global batch of `batch_size` rows.
  Without `drop_remainder` the last, partial global batch is kept, filled up with empty
  rows (segment 0: no loss), so that every token of the documents is in some batch.

  Documents are shuffled per epoch by `seed`, concatenated and split into rows (a long
  document continues in the next row as a new segment). Every process packs the same
  global stream and keeps its own rows, so the global batch, and the loss, are the same
  for any number of processes (sharding whole documents by process would give each
  process different packed rows and a different global batch).
  """
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by {shard_count} data shards")
  ds = grain.MapDataset.source(list(token_docs))
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(lambda t: {"tokens": t}).to_iter_dataset()
  ds = grain_exp.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if not drop_remainder:
    ds = ds.map(functools.partial(_fill_rows, rows=batch_size))
  if shard_count == 1:
    return ds
  rows = batch_size // shard_count
  lo, hi = shard_index * rows, (shard_index + 1) * rows
  return ds.map(lambda b: {k: v[lo:hi] for k, v in b.items()})


def _fill_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """`batch` with zero rows appended up to `rows` (zero segment ids mask them out)."""
  return {k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Model inputs and targets from packed rows: the loss mask drops cross-document and pad."""
  tokens, seg, pos = (packed["tokens"], packed["tokens_segment_ids"],
                      packed["tokens_positions"])
  mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  return {"tokens": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "positions": pos[:, :-1].astype(np.int32), "segment_ids": seg[:, :-1].astype(np.int32),
          "loss_mask": mask.astype(np.float32)}
