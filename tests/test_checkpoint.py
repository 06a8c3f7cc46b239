"""moe_jax checkpoint directories: round trip, restore onto a mesh, atomic writes."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax import checkpoint, sharding
from moe_jax.config import ModelConfig
from moe_jax.models import llama
from moe_jax.moe.config import MoeConfig
from moe_jax.stacked import ExpertStack

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


MOE_CFG = CFG.replace(moe=MoeConfig(num_experts=4, top_k=2, expert_dim=16))


def test_expert_stacks_are_written_one_expert_at_a_time(tmp_path):
  """write_items builds each expert once and alone; load stacks the slices again, also
  onto a mesh with the expert axis."""
  model = llama.create(MOE_CFG, seed=5)
  pure = nnx.to_pure_dict(nnx.state(model))
  built = []

  def lazy(name, w):
    w = np.asarray(w)
    def build(e):
      built.append((name, e))
      return w[e]
    return ExpertStack(w.shape[0], build, w.shape[1:], w.dtype)

  items = list(checkpoint.split_items(pure))
  for name, tree in items:
    if name != "root" and "w_gate" in tree.get("mlp", {}):
      tree["mlp"] = {k: lazy((name, k), v) if k.startswith("w_") else v
                     for k, v in tree["mlp"].items()}
  path = str(tmp_path / "ckpt")
  checkpoint.write_items(path, MOE_CFG, iter(items))
  assert sorted(built) == sorted(((n, k), e) for n, _ in items if n != "root"
                                 for k in ("w_gate", "w_up", "w_down") for e in range(4))
  names = sorted(os.listdir(os.path.join(path, "params")))
  assert "layer_001.expert_003.mlp.w_down" in names and "layer_001" in names
  jax.tree.map(np.testing.assert_array_equal, _params(checkpoint.load(path)), _params(model))
  restored = checkpoint.load(path, sharding.make_mesh(data=2, expert=4))
  w = restored.layers[0].mlp.w_gate[...]
  assert w.sharding.spec[0] == "expert" and w.addressable_shards[0].data.shape[0] == 1
  jax.tree.map(np.testing.assert_array_equal, _params(restored), _params(model))


def test_missing_expert_slice_is_one_line_error(tmp_path):
  path = str(tmp_path / "ckpt")
  model = llama.create(MOE_CFG, seed=6)
  pure = nnx.to_pure_dict(nnx.state(model))
  items = list(checkpoint.split_items(pure))
  for name, tree in items:
    if name != "root":
      tree["mlp"]["w_up"] = ExpertStack.of(list(np.asarray(tree["mlp"]["w_up"])))
  checkpoint.write_items(path, MOE_CFG, iter(items))
  import shutil
  shutil.rmtree(os.path.join(path, "params", "layer_000.expert_002.mlp.w_up"))
  with pytest.raises(ValueError, match=r"layers/0/mlp/w_up has expert slices \[0, 1, 3\]"):
    checkpoint.load(path)
