"""moe_jax checkpoint directories: round trip, restore onto a mesh, atomic writes."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax import checkpoint, sharding
from moe_jax.config import ModelConfig
from moe_jax.models import llama

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  ffn_dim=48, qkv_bias=True, qk_norm=True)


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def test_round_trip_single_device(tmp_path):
  model = llama.create(CFG, seed=3)
  path = str(tmp_path / "ckpt")
  checkpoint.save(path, model, provenance={"source": "test"})
  assert checkpoint.read_meta(path)["provenance"] == {"source": "test"}
  restored = checkpoint.load(path)
  assert restored.cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, _params(restored), _params(model))


def test_restore_onto_mesh(tmp_path):
  model = llama.create(CFG, seed=4)
  path = str(tmp_path / "ckpt")
  checkpoint.save(path, model)
  mesh = sharding.make_mesh(fsdp=2, tensor=2)
  restored = checkpoint.load(path, mesh)
  wq = restored.layers[0].attn.wq[...]
  assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(wq.addressable_shards) == 4
  jax.tree.map(np.testing.assert_array_equal, _params(restored), _params(model))


def test_existing_dir_is_refused_and_nothing_is_left(tmp_path):
  path = tmp_path / "ckpt"
  path.mkdir()
  (path / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match=f"{path}: exists and is not empty"):
    checkpoint.save(str(path), llama.create(CFG))
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
  assert os.listdir(path) == ["keep.txt"]


def test_failed_write_leaves_nothing(tmp_path):
  class Boom:
    def save(self, _):
      raise RuntimeError("disk full")
  with pytest.raises(RuntimeError):
    checkpoint.save(str(tmp_path / "ckpt"), llama.create(CFG), tokenizer=Boom())
  assert os.listdir(tmp_path) == []
