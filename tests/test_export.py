"""Export to Mixtral / Qwen2-MoE / Qwen3-MoE, checked against transformers' logits, and
re-imported."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_models
from moe_jax import checkpoint
from moe_jax.convert import assemble, export_hf, hf, load
from moe_jax.models import llama
from moe_jax.moe.config import MoeConfig
from moe_jax.upcycle import convert, methods


def _upcycle(arch, tmp_path, **spec):
  path = str(tmp_path / arch)
  hf_models.make_model(arch).save_pretrained(path)
  cfg = hf.read_hf_config(path)
  spec = methods.UpcycleSpec(**spec)
  moe_cfg = convert.moe_model_config(cfg, spec)
  up = convert.Upcycler(spec, moe_cfg, "normal", 0.5)
  return convert.model_from_items(moe_cfg, convert.upcycle_items(cfg, hf.iter_safetensors(path), up))


def _random_moe(arch, tmp_path, **moe):
  """A random MoE model on a tiny dense architecture, all weights O(1/sqrt(fan_in))."""
  cfg = hf.read_hf_config(_save_dense(arch, tmp_path)).replace(moe=MoeConfig(**moe))
  model = llama.create(cfg, seed=1)
  state = nnx.state(model)
  keys = iter(jax.random.split(jax.random.key(2), 1000))
  state = jax.tree.map(lambda v: jax.random.normal(next(keys), v.shape) * 0.3, state)
  nnx.update(model, state)
  return model


def _save_dense(arch, tmp_path):
  path = str(tmp_path / f"dense_{arch}")
  hf_models.make_model(arch).save_pretrained(path)
  return path


def _export_and_compare(model, fmt, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save(ckpt, model)
  out = export_hf.export(ckpt, str(tmp_path / fmt), fmt)
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(ref).__name__ == export_hf._ARCHITECTURES[fmt]
  tokens = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (2, 20))
  ours = np.asarray(checkpoint.load(ckpt)(jnp.asarray(tokens))[0])
  theirs = hf_models.logits(ref, tokens)
  assert np.std(theirs) > 0.3
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  return out


def _flat(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_mixtral(tmp_path):
  model = _upcycle("llama", tmp_path, method="virtual_group", num_experts=8, top_k=4,
                   granularity=2)
  out = _export_and_compare(model, "mixtral", tmp_path)
  again, _ = load.load_model(out)
  ours = _flat(model)
  assert again.cfg.moe.router == "topk_softmax" and _flat(again).keys() == ours.keys()
  for k, v in _flat(again).items():
    np.testing.assert_array_equal(v, ours[k], err_msg=str(k))


def test_qwen2_moe_gated_shared_expert_and_scaling(tmp_path):
  model = _random_moe("qwen2", tmp_path, num_experts=4, top_k=2, expert_dim=24,
                      router="softmax_topk", topk_scaling_factor=2.0, shared_expert_dim=40,
                      shared_expert_gate=True, layers="1")
  _export_and_compare(model, "qwen2_moe", tmp_path)


def test_qwen2_moe_reimport(tmp_path):
  model = _random_moe("qwen2", tmp_path, num_experts=4, top_k=2, expert_dim=24,
                      router="softmax_topk", shared_expert_dim=40, shared_expert_gate=True)
  out = _export_and_compare(model, "qwen2_moe", tmp_path)
  again, _ = load.load_model(out)
  ours = _flat(model)
  for k, v in _flat(again).items():
    np.testing.assert_array_equal(v, ours[k], err_msg=str(k))


def test_qwen2_moe_from_llama_without_shared_expert(tmp_path):
  model = _upcycle("llama", tmp_path, method="copy", num_experts=4, top_k=2, router="softmax_topk")
  _export_and_compare(model, "qwen2_moe", tmp_path)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen3_moe(tmp_path, norm):
  model = _upcycle("qwen3", tmp_path, method="virtual_group", num_experts=4, top_k=2,
                   granularity=2, router="softmax_topk", norm_topk_prob=norm)
  _export_and_compare(model, "qwen3_moe", tmp_path)


@pytest.mark.parametrize("arch,moe,fmt,msg", [
    ("llama", dict(router="softmax_topk"), "mixtral", "Mixtral renormalises"),
    ("llama", dict(router="sigmoid_bias"), "qwen2_moe", "router 'sigmoid_bias' has no equivalent"),
    ("llama", dict(), "qwen3_moe", "always applies q/k RMSNorm"),
    ("llama", dict(shared_expert_dim=8), "qwen2_moe", "ungated"),
    ("llama", dict(layers="1"), "mixtral", "every layer to be MoE"),
    ("llama", dict(), "gpt_moe", "--format='gpt_moe'"),
])
def test_refuses_what_a_format_cannot_express(tmp_path, arch, moe, fmt, msg):
  model = _random_moe(arch, tmp_path, **{"num_experts": 4, "top_k": 2, "expert_dim": 8, **moe})
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save(ckpt, model)
  with pytest.raises(ValueError, match=msg):
    export_hf.export(ckpt, str(tmp_path / "out"), fmt)
  assert not os.path.exists(tmp_path / "out")


def test_binary_one_line_error(tmp_path):
  model = _random_moe("llama", tmp_path, num_experts=4, top_k=2, expert_dim=8)
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save(ckpt, model)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-m", "experiments.export_hf", f"--checkpoint={ckpt}",
                      f"--out={tmp_path / 'out'}", "--format=qwen3_moe"], cwd=root,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
  assert "qwen3_moe cannot represent this model" in r.stderr
