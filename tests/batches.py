"""A synthetic language-model batch, as the data pipeline hands one to the train step."""
import numpy as np


def lm_batch(b: int, length: int, vocab: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens [b, length] with next-token targets, plain positions, one segment per
  row and every position in the loss."""
  tokens = np.random.default_rng(seed).integers(0, vocab, (b, length + 1))
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.tile(np.arange(length), (b, 1)),
          "segment_ids": np.ones((b, length), np.int32),
          "loss_mask": np.ones((b, length), np.float32)}
