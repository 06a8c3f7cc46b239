"""The benchmark library's model shapes and training-throughput step (the figures come
from experiments.bench_train on the machines docs/benchmarks.md names)."""
import dataclasses
import math

import pytest

from moe_jax import bench
from moe_jax.convert import load


def test_smollm2_shape_is_the_embedded_models_config():
  want = load.open_source("").cfg
  got = bench.model_shape("smollm2-135m")
  for f in dataclasses.fields(want):
    a, b = getattr(got, f.name), getattr(want, f.name)
    assert (math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b), f.name


def test_model_shape_upcycles_and_names_bad_input():
  cfg = bench.model_shape("seed", experts=4, top_k=2, backend="capacity")
  assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.backend) == (4, 2, "capacity")
  assert cfg.moe.expert_dim == cfg.ffn_dim and len(cfg.moe_layer_ids) == cfg.n_layers
  with pytest.raises(ValueError, match="model='nope': expected one of"):
    bench.model_shape("nope")


def test_bench_train_steps_an_upcycled_model():
  cfg = bench.model_shape("seed", experts=4).replace(
      vocab_size=256, n_layers=2, dtype="bfloat16", scan_layers=True)
  r = bench.bench_train(cfg, batch=2, length=16, steps=1, rounds=1)
  assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and r["mfu"] is None
  assert r["params"] > r["active_params"] > 0
