"""The embedded SmolLM2-135M-Instruct GGUF: tensors, logits, tokenizer and perplexity
checked against transformers loading the same file."""
import functools
import os
import shutil
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from moe_jax import evaluate, runs
from moe_jax.convert import gguf, load
from moe_jax.data import corpus
from configs import evaluate as eval_config

PATH = gguf.embedded_gguf_path()


@pytest.fixture(scope="session")
def gguf_reader():
  """The `gguf` package's reader of the file, parsed once: transformers parses the header
  anew for the config, the weights and the tokenizer (7 s each, in pure Python), and
  rebuilds the same tensor-name map for each of its ~400 modules (9 s)."""
  import gguf as gguf_pkg  # pylint: disable=g-import-not-at-top
  cached = functools.lru_cache(maxsize=1)(gguf_pkg.GGUFReader)
  name_map = functools.lru_cache(maxsize=4)(gguf_pkg.get_tensor_name_map)
  with mock.patch.object(gguf_pkg, "GGUFReader", cached), \
       mock.patch.object(gguf_pkg, "get_tensor_name_map", name_map):
    yield cached


@pytest.fixture(scope="session")
def hf_model(gguf_reader):
  del gguf_reader  # transformers reads the file through it
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(PATH), gguf_file=os.path.basename(PATH), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_reader):
  del gguf_reader
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(PATH),
                                                    gguf_file=os.path.basename(PATH))


@pytest.fixture(scope="session")
def ours():
  return load.load_model("")


def test_config():
  cfg = load.read_config("")
  assert (cfg.n_layers, cfg.d_model, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads) == (30, 576, 1536, 9, 3)
  assert cfg.tie_embeddings and cfg.rope_theta == 100000.0


def test_tensors_equal_transformers(hf_model):
  """Every dequantised tensor, q/k un-permuted, equals transformers' own reading."""
  state = hf_model.state_dict()
  names = set()
  for name, w in gguf.iter_gguf_tensors(PATH):
    np.testing.assert_array_equal(w, state[name].numpy(), err_msg=name)
    names.add(name)
  assert names == set(state) - {"lm_head.weight"}  # tied: no output.weight in the file


def test_logits_match_transformers(hf_model, ours):
  model, _ = ours
  tokens = np.random.RandomState(0).randint(0, 49152, (2, 48))
  with torch.no_grad():
    ref = hf_model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))[0]), ref, atol=1e-3, rtol=0)


def test_tokenizer_matches_transformers(hf_tokenizer):
  tok = load.load_tokenizer(PATH)
  code = open(corpus.stdlib_files()[0], encoding="utf-8").read()
  samples = [corpus.embedded_eval_text()[:50000], code, "x  \t\n\n 12345 6.02e23 ÄÖü ß 🤗 日本",
             "<|im_start|>user\nhi<|im_end|>"]
  for text in samples:
    assert tok.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)


def test_perplexity_matches_transformers(hf_model, tmp_path):
  config = eval_config.get_config()
  config.seq_len, config.max_windows, config.batch_size = 128, 2, 2
  result = runs.evaluate(config, str(tmp_path))
  ids = load.load_tokenizer(PATH).encode(corpus.embedded_eval_text())
  windows = torch.as_tensor(evaluate.make_windows(ids, 128, 2), dtype=torch.long)
  with torch.no_grad():
    logp = torch.log_softmax(hf_model(windows).logits[:, :-1].float(), -1)
    ref = -logp.gather(-1, windows[:, 1:, None]).mean().item()
  assert result["tokens"] == 2 * 127
  assert abs(result["ppl"] / np.exp(ref) - 1) < 1e-3
  assert os.path.exists(tmp_path / "eval.json")


def test_truncated_and_foreign_files(tmp_path):
  bad = tmp_path / "cut.gguf"
  with open(PATH, "rb") as f:
    bad.write_bytes(f.read(os.path.getsize(PATH) // 2))
  with pytest.raises(ValueError, match=f"{bad}: .*truncated"):
    list(gguf.iter_gguf_tensors(str(bad)))
  foreign = tmp_path / "x.gguf"
  foreign.write_bytes(b"PK\x03\x04" + b"\0" * 64)
  with pytest.raises(ValueError, match=f"{foreign}: not a GGUF file"):
    gguf.read_gguf_config(str(foreign))


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
  n_head = 6
  permuted = w.reshape(n_head, 2, 4, 3).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's permute
  np.testing.assert_array_equal(gguf.unpermute_rotary(permuted, n_head), w)


def test_header_parser_equals_gguf_reader(gguf_reader):
  """Our one-pass header parser against the `gguf` package's reader on the same file."""
  ours, ref = gguf.open_reader(PATH), gguf_reader(PATH)
  want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
  assert ours.fields == want
  assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
  for a, b in zip(ours.tensors, ref.tensors):
    assert (a.tensor_type, a.shape, a.data_offset, a.n_bytes) == (
        b.tensor_type, tuple(b.shape.tolist()), b.data_offset, b.n_bytes)
    np.testing.assert_array_equal(a.data, b.data)


def test_corrupt_header(tmp_path):
  with open(PATH, "rb") as f:
    head = f.read(4096)
  cut = tmp_path / "head.gguf"
  cut.write_bytes(head)  # ends inside the vocabulary
  with pytest.raises(ValueError, match=f"^{cut}: truncated GGUF file"):
    gguf.open_reader(str(cut))
  odd = tmp_path / "v9.gguf"
  odd.write_bytes(head[:4] + (9).to_bytes(4, "little") + head[8:])
  with pytest.raises(ValueError, match=f"^{odd}: GGUF version 9 is not supported"):
    gguf.read_gguf_config(str(odd))
