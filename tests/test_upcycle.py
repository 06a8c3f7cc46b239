"""Upcycling through the model: function preservation where the math allows, on a tiny
llama and on SmolLM2, and the binary's errors (the methods' math: test_upcycle_methods.py)."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from moe_jax.convert import assemble, hf, load
from moe_jax.upcycle import convert, methods

E = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random llama (F=96) saved as safetensors, and its dense logits."""
  path = str(tmp_path_factory.mktemp("dense") / "llama")
  hf_models.make_model("llama").save_pretrained(path)
  cfg = hf.read_hf_config(path)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24)))
  dense = assemble.model_from_tensors(cfg, hf.iter_safetensors(path))
  return path, cfg, tokens, np.asarray(dense(tokens)[0])


def upcycled_logits(path, cfg, tokens, router_kind="normal", std=0.5, layers="all", **spec):
  spec = methods.UpcycleSpec(**spec)
  moe_cfg = convert.moe_model_config(cfg, spec, layers)
  up = convert.Upcycler(spec, moe_cfg, router_kind, std)
  items = convert.upcycle_items(cfg, hf.iter_safetensors(path), up) if isinstance(path, str) \
      else convert.upcycle_items(cfg, path, up)
  model = convert.model_from_items(moe_cfg, items)
  return np.asarray(model(tokens)[0])


def test_copy_preserves_function(tiny):
  path, cfg, tokens, dense = tiny
  out = upcycled_logits(path, cfg, tokens, method="copy", num_experts=E, top_k=2)
  assert np.abs(out - dense).max() <= 1e-5


# Exactness for every G is checked on the math in test_upcycle_methods.py; here the real
# model (routing, dispatch, checkpoint items) for a split and the finest grouping.
@pytest.mark.parametrize("g", [2, 8])
def test_virtual_group_preserves_function(tiny, g):
  path, cfg, tokens, dense = tiny
  for top_k in sorted({g, min(2 * g, E)}):
    out = upcycled_logits(path, cfg, tokens, method="virtual_group", num_experts=E, top_k=top_k,
                          granularity=g, router="topk_softmax")
    assert np.abs(out - dense).max() <= 1e-5, ("topk_softmax", g, top_k)
    out = upcycled_logits(path, cfg, tokens, "zeros", method="virtual_group", num_experts=E,
                          top_k=top_k, granularity=g, router="softmax_topk")
    assert np.abs(out - dense).max() <= 1e-5, ("softmax_topk", g, top_k)


@pytest.mark.parametrize("mode", ["random", "kmeans"])
def test_partition_with_all_experts_is_dense(tiny, mode):
  path, cfg, tokens, dense = tiny
  out = upcycled_logits(path, cfg, tokens, "zeros", method="partition", num_experts=4, top_k=4,
                        partition=mode)
  assert np.abs(out - dense).max() <= 1e-5


def test_smollm2_upcycle_preserves_function():
  """Three of SmolLM2's 30 layers upcycled (the math is per layer), 30-layer tolerance."""
  src = load.open_source("")
  cfg = src.cfg
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 32)))
  base = np.asarray(src.model()(tokens)[0])
  tensors = list(src.tensors())
  # copy is checked through the model on the tiny llama and on all 30 layers by the demo
  for kw in (dict(method="virtual_group", num_experts=8, top_k=4, granularity=4),):
    out = upcycled_logits(tensors, cfg, tokens, layers="0,15,29", **kw)
    assert np.abs(out - base).max() <= 1e-4, kw


def _run(args, cwd):
  return subprocess.run([sys.executable, "-m", "experiments.upcycle", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_binary_refuses_before_writing(tiny, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = tiny[0]
  out = tmp_path / "moe"
  r = _run(["--config=configs/upcycle.py:method=virtual_group,granularity=5", f"--workdir={out}",
            f"--config.source={path}"], root)
  assert r.returncode != 0 and "granularity=5 does not divide ffn_dim=96" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
  out.mkdir()
  (out / "x").write_text("keep")
  r = _run(["--config=configs/upcycle.py", f"--workdir={out}", f"--config.source={path}"], root)
  assert r.returncode != 0 and "exists and is not empty" in r.stderr
  assert os.listdir(out) == ["x"]
