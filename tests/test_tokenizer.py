"""The byte-level BPE a scratch run learns: deterministic, lossless on any text, read the
same by transformers, and a one-line error for a bad spec."""
import subprocess
import sys

import pytest
import transformers

from moe_jax import tokenizer as tokenizer_lib
from moe_jax.data import corpus

TEXTS = corpus.stdlib_documents("train")[:6]
SAMPLES = [TEXTS[0][:3000], "x  \t\n\n 12345 6.02e23 ÄÖü ß 🤗 日本", "<|endoftext|> and\r\nmore"]
SHA = ("import hashlib; from moe_jax import tokenizer as t; from moe_jax.data import corpus; "
       "print(hashlib.sha256(t.train_bpe(corpus.stdlib_documents('train')[:6], 600)"
       ".tok.to_str().encode()).hexdigest())")


@pytest.fixture(scope="module")
def bpe():
  return tokenizer_lib.train_bpe(TEXTS, 600)


def test_size_and_special_token(bpe):
  assert bpe.vocab_size == 600 and bpe.eos_id == 0 and bpe.bos_id is None
  assert bpe.tok.id_to_token(0) == tokenizer_lib.END_OF_TEXT


def test_any_text_round_trips_and_merges_shorten_it(bpe):
  for text in SAMPLES:
    assert bpe.decode(bpe.encode(text)) == text
  code = TEXTS[0][:3000]
  assert len(bpe.encode(code)) < 0.6 * len(code.encode())


def test_the_same_in_another_process(bpe):
  """Rust hash maps are seeded per process; the merges must not depend on it."""
  import hashlib  # pylint: disable=g-import-not-at-top
  want = hashlib.sha256(bpe.tok.to_str().encode()).hexdigest()
  for _ in range(2):
    got = subprocess.run([sys.executable, "-c", SHA], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert got == want


def test_transformers_reads_the_saved_tokenizer(bpe, tmp_path):
  bpe.save(str(tmp_path))
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  for text in SAMPLES:
    assert hf.encode(text, add_special_tokens=False) == bpe.encode(text)
  again = tokenizer_lib.tokenizer_from_hf_dir(str(tmp_path))
  assert (again.eos_id, again.bos_id, again.encode(SAMPLES[1])) == (0, None, bpe.encode(SAMPLES[1]))


@pytest.mark.parametrize("spec", ["bpe:100", "bpe", "bpe:x", "wordpiece:1000"])
def test_bad_spec_is_one_line(spec):
  with pytest.raises(ValueError) as e:
    tokenizer_lib.bpe_vocab_size(spec)
  assert f"config.scratch.tokenizer={spec!r}" in str(e.value) and "\n" not in str(e.value)


def test_no_spec_is_the_embedded_vocabulary():
  assert tokenizer_lib.bpe_vocab_size("") is None
