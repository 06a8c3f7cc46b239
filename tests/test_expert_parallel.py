"""Expert parallelism on fake CPU meshes: one training step's loss and gradients equal the
single-device ones; params per device fall as the expert and fsdp axes grow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.models import llama
from moe_jax.moe import expert_parallel
from moe_jax.moe.config import MoeConfig
from moe_jax.train import step

MESHES = [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2), dict(expert=8)]


def _cfg(backend: str) -> ModelConfig:
  # capacity_factor E/k makes C = the shard's token count: nothing drops, as on one device.
  moe = MoeConfig(num_experts=8, top_k=2, expert_dim=16, backend=backend, capacity_factor=4.0,
                  aux_loss_coeff=0.01, z_loss_coeff=0.001)
  return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, ffn_dim=48, moe=moe)


def _batch(b=8, length=16):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (b, length + 1))
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.tile(np.arange(length), (b, 1)),
          "segment_ids": np.ones((b, length), np.int32),
          "loss_mask": np.ones((b, length), np.float32)}


def _loss_and_grads(model, batch):
  def f(m):
    return step.loss_fn(m, batch, train=True)[0]
  loss, grads = nnx.value_and_grad(f)(model)
  return loss, grads


@pytest.mark.parametrize("backend", ["capacity", "dropless"])
@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_sharded_step_matches_one_device(backend, axes, monkeypatch):
  calls = []
  dispatch_local = expert_parallel._dispatch_local
  monkeypatch.setattr(expert_parallel, "_dispatch_local",
                      lambda *a: calls.append(1) or dispatch_local(*a))
  cfg = _cfg(backend)
  batch = _batch()
  loss1, grads1 = nnx.jit(_loss_and_grads)(llama.create(cfg, seed=0), batch)
  mesh = sharding.make_mesh(**axes)
  model = sharding.place(llama.create(cfg, seed=0), mesh)
  spec = sharding.logical_to_spec(("batch", "length"), mesh_axes=mesh.axis_names)
  sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, spec)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    loss, grads = nnx.jit(_loss_and_grads)(model, sharded)
  assert calls, "the expert-parallel dispatch was not used"
  w = model.layers[0].mlp.w_gate[...]
  assert w.sharding.spec[0] == "expert"
  assert w.addressable_shards[0].data.shape[0] == 8 // axes["expert"]
  np.testing.assert_allclose(float(loss), float(loss1), rtol=0, atol=1e-5)
  flat1 = dict(nnx.to_flat_state(grads1))
  for path, g in nnx.to_flat_state(grads):
    np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(flat1[path].get_value()),
                               rtol=0, atol=1e-5, err_msg=str(path))
