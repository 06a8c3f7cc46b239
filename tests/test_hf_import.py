"""Import of Hugging Face safetensors checkpoints, checked against transformers' logits."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from moe_jax import sharding
from moe_jax.convert import assemble, hf
from moe_jax.models import llama

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _save(arch, tmp_path, **kw):
  model = hf_models.make_model(arch, **kw)
  path = str(tmp_path / arch)
  model.save_pretrained(path)
  return model, path


def _tokens(batch=2, length=24, vocab=97, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (batch, length))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tmp_path):
  ref_model, path = _save(arch, tmp_path)
  cfg = hf.read_hf_config(path)
  model = assemble.model_from_tensors(cfg, hf.iter_safetensors(path))
  tokens = _tokens()
  ours, _ = model(jnp.asarray(tokens))
  ref = hf_models.logits(ref_model, tokens)
  assert np.std(ref) > 0.5  # the check is only meaningful when logits are not tiny
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_config_fields(tmp_path):
  _, path = _save("qwen3", tmp_path)
  cfg = hf.read_hf_config(path)
  assert (cfg.head_dim, cfg.qk_norm, cfg.qkv_bias, cfg.arch) == (24, True, False, "qwen3")
  _, path = _save("llama", tmp_path)
  cfg = hf.read_hf_config(path)
  assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0
  _, path = _save("mistral", tmp_path)
  assert hf.read_hf_config(path).sliding_window == 8


def test_tied_embeddings(tmp_path):
  ref_model, path = _save("llama", tmp_path, tie_word_embeddings=True)
  model = assemble.model_from_tensors(hf.read_hf_config(path), hf.iter_safetensors(path))
  assert model.cfg.tie_embeddings and not hasattr(model, "lm_head")
  tokens = _tokens()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))[0]),
                             hf_models.logits(ref_model, tokens), atol=1e-4, rtol=0)


def test_sharded_import_matches_single_device(tmp_path):
  _, path = _save("qwen2", tmp_path)
  cfg = hf.read_hf_config(path)
  tokens = jnp.asarray(_tokens(batch=8))
  single, _ = assemble.model_from_tensors(cfg, hf.iter_safetensors(path))(tokens)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = assemble.model_from_tensors(cfg, hf.iter_safetensors(path), mesh)
  wq = model.layers[0].attn.wq[...]
  assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  with jax.set_mesh(mesh):
    sharded, _ = jax.jit(lambda m, t: m(t))(model, tokens)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)


def test_packed_segments_do_not_attend_across(tmp_path):
  ref_model, path = _save("llama", tmp_path)
  model = assemble.model_from_tensors(hf.read_hf_config(path), hf.iter_safetensors(path))
  a, b = _tokens(1, 10, seed=1)[0], _tokens(1, 14, seed=2)[0]
  packed = jnp.asarray(np.concatenate([a, b])[None])
  positions = jnp.asarray(np.concatenate([np.arange(10), np.arange(14)])[None])
  segments = jnp.asarray(np.array([1] * 10 + [2] * 14)[None])
  out, _ = model(packed, positions, segments)
  np.testing.assert_allclose(np.asarray(out[0, :10]), hf_models.logits(ref_model, a[None])[0],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out[0, 10:]), hf_models.logits(ref_model, b[None])[0],
                             atol=1e-4, rtol=0)


# --- bad input: one line naming the file/tensor/key ---

def test_unknown_architecture(tmp_path):
  _, path = _save("llama", tmp_path)
  cfg_path = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["model_type"] = "gpt_neox"
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(ValueError, match=r"config\.json: model_type='gpt_neox' is not supported"):
    hf.read_hf_config(path)


def test_missing_path():
  from moe_jax.convert import load
  with pytest.raises(FileNotFoundError, match="/no/such/dir: checkpoint not found"):
    load.load_model("/no/such/dir")


def _rewrite(path, drop=None, reshape=None):
  from safetensors.numpy import load_file, save_file
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  if drop:
    del tensors[drop]
  if reshape:
    tensors[reshape] = tensors[reshape][:-1]
  save_file(tensors, file, metadata={"format": "pt"})
  return file


def test_missing_tensor(tmp_path):
  _, path = _save("llama", tmp_path)
  file = _rewrite(path, drop="model.layers.1.mlp.up_proj.weight")
  with pytest.raises(ValueError, match=rf"{file}: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    assemble.model_from_tensors(hf.read_hf_config(path), hf.iter_safetensors(path))


def test_wrong_shape(tmp_path):
  _, path = _save("llama", tmp_path)
  file = _rewrite(path, reshape="model.layers.0.self_attn.k_proj.weight")
  with pytest.raises(ValueError, match=r"k_proj\.weight' has shape \(31, 64\)"):
    assemble.model_from_tensors(hf.read_hf_config(path), hf.iter_safetensors(path))


def test_truncated_file(tmp_path):
  _, path = _save("llama", tmp_path)
  file = os.path.join(path, "model.safetensors")
  data = open(file, "rb").read()
  open(file, "wb").write(data[: len(data) // 2])
  with pytest.raises(ValueError, match=rf"{file}: cannot read safetensors"):
    assemble.model_from_tensors(hf.read_hf_config(path), hf.iter_safetensors(path))
