"""Expert parallelism and the mesh on 8 fake CPU devices: one training step's loss and
gradients equal one device's; params and optimizer state per device fall as the expert
and fsdp axes grow; checkpoints move between meshes; bad meshes fail before compiling."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import batches

from moe_jax import checkpoint, runs, sharding
from moe_jax.config import ModelConfig
from moe_jax.data import pipeline
from moe_jax.models import layer_stack, llama
from moe_jax.moe import expert_parallel, layer
from moe_jax.moe.config import MoeConfig
from moe_jax.train import checkpoints as train_ckpt, loop, optim, step

MESHES = [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2), dict(expert=8)]
_mesh_id = lambda a: "-".join(f"{k}{v}" for k, v in a.items())


def _cfg(backend: str = "dropless") -> ModelConfig:
  # capacity_factor = E/k makes C = a shard's token count: nothing drops on any shard, as
  # on one device (with drops, a shard ranks only its own tokens; see expert_parallel.py).
  moe = MoeConfig(num_experts=8, top_k=2, expert_dim=16, backend=backend, capacity_factor=4.0,
                  aux_loss_coeff=0.1, z_loss_coeff=0.01)
  return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, ffn_dim=48, moe=moe)


O0 = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time; same numerics


def _loss_and_grads(model, batch):
  graphdef, state = nnx.split(model)

  def f(state, batch):
    m = nnx.merge(graphdef, state)
    return nnx.value_and_grad(lambda m: step.loss_fn(m, batch, train=True)[0])(m)

  return jax.jit(f).lower(state, batch).compile(O0)(state, batch)


_REFERENCE = {}  # backend -> (loss, grads) on one device; the same for every mesh
_PARAMS = {}


def _model(backend: str, mesh):
  """The seed-0 model with `backend`, params created sharded once, then placed on `mesh`."""
  if not _PARAMS:
    _PARAMS["state"] = nnx.state(llama.create(_cfg(), seed=0, mesh=sharding.make_mesh(expert=8)))
  graphdef, _ = nnx.split(llama.abstract(_cfg(backend)))
  return sharding.place(nnx.merge(graphdef, _PARAMS["state"]), mesh)


def _pure(tree):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(tree))


@pytest.mark.parametrize("backend", ["capacity", "dropless"])
@pytest.mark.parametrize("axes", MESHES, ids=_mesh_id)
def test_sharded_step_matches_one_device(backend, axes, monkeypatch):
  calls = []
  ep = expert_parallel.moe_forward_ep
  monkeypatch.setattr(expert_parallel, "moe_forward_ep", lambda *a, **k: calls.append(1) or ep(*a, **k))
  mesh = sharding.make_mesh(**axes)
  model = _model(backend, mesh)
  batch = batches.lm_batch(8, 16)
  if backend not in _REFERENCE:  # the same values (any mesh: partitionable RNG) on one device
    _REFERENCE[backend] = _loss_and_grads(sharding.place(model, None), batch)
    assert not calls
  loss1, grads1 = _REFERENCE[backend]
  spec = sharding.logical_to_spec(("batch", "length"), mesh_axes=mesh.axis_names)
  sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, spec)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    loss, grads = _loss_and_grads(model, sharded)
  assert calls, "the expert-parallel dispatch was not used"
  w = model.layers[0].mlp.w_gate[...]
  assert w.sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in w.addressable_shards} == {8 // axes["expert"]}
  np.testing.assert_allclose(float(loss), float(loss1), rtol=0, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               _pure(grads), _pure(grads1))


def test_bytes_per_device_fall_with_expert_and_fsdp():
  """Params (created sharded, then placed on each mesh) and AdamW state (created sharded
  like them) per device: max over devices, as the expert and fsdp axes grow."""
  meshes = (dict(data=8), dict(data=4, expert=2), dict(data=2, expert=4), dict(expert=8),
            dict(data=4, fsdp=2), dict(fsdp=2, expert=4))
  model = llama.create(_cfg(), seed=0, mesh=sharding.make_mesh(**meshes[-1]))
  sizes = {}
  for axes in meshes:
    mesh = sharding.make_mesh(**axes)
    model = sharding.place(model, mesh)
    opt = step.make_optimizer(model, optim.OptimConfig(), mesh)
    w = model.layers[1].mlp.w_down[...]
    assert {s.data.shape[0] for s in w.addressable_shards} == {8 // axes.get("expert", 1)}
    mu = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(opt))
          if p[-5:] == ("mu", "layers", 1, "mlp", "w_down")]
    assert len(mu) == 1 and mu[0].sharding.is_equivalent_to(w.sharding, 3)
    sizes[_mesh_id(axes)] = (max(sharding.bytes_per_device(nnx.state(model)).values()),
                             max(sharding.bytes_per_device(nnx.state(opt)).values()))
  print("max bytes per device (params, optimizer):", sizes)
  for a, b in (("data8", "data4-expert2"), ("data4-expert2", "data2-expert4"),
               ("data2-expert4", "expert8"), ("data8", "data4-fsdp2"),
               ("data2-expert4", "fsdp2-expert4")):
    assert sizes[b][0] < sizes[a][0] and sizes[b][1] < sizes[a][1], (a, b, sizes)


def test_checkpoint_moves_between_meshes(tmp_path):
  """A model checkpoint and the training state (params + AdamW state, orbax) saved on one
  mesh restore onto another mesh and onto one device unchanged."""
  cfg, opt_cfg = _cfg(), optim.OptimConfig()
  mesh_a, mesh_b = sharding.make_mesh(fsdp=2, expert=4), sharding.make_mesh(data=2, expert=2,
                                                                             tensor=2)
  model = llama.create(cfg, seed=1, mesh=mesh_a)
  opt = step.make_optimizer(model, opt_cfg, mesh_a)
  nnx.update(opt, jax.tree.map(lambda x: x + 1, nnx.state(opt)))  # non-zero moments
  want = _pure(nnx.state((model, opt)))
  checkpoint.save(str(tmp_path / "model"), model)
  got = checkpoint.load(str(tmp_path / "model"), mesh_b)
  jax.tree.map(np.testing.assert_array_equal, _pure(nnx.state(got)), want[0])
  docs = [np.arange(40, dtype=np.int32) % 64] * 4
  data = iter(pipeline.packed_dataset(docs, 16, 8, 0))
  mngr = train_ckpt.manager(str(tmp_path / "state"), keep=1)
  loop._save(mngr, 1, nnx.state((model, opt)), data, {}, tokens_per_step=128)
  mngr.wait_until_finished()
  with nnx.use_eager_sharding(False):  # restore targets: shapes and logical names only
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda m: (m, nnx.Optimizer(m, optim.make_tx(opt_cfg), wrt=nnx.Param)), model))
  for mesh in (mesh_b, None):
    state = jax.tree.map(lambda x: x, abstract)
    loop._restore(mngr, 1, state, data, mesh)
    jax.tree.map(np.testing.assert_array_equal, _pure(state), want)
    m2, _ = nnx.merge(graphdef, state)
    w = m2.layers[0].mlp.w_up[...]
    assert w.sharding == sharding.variable_sharding(m2.layers[0].mlp.w_up, mesh)
  mngr.close()


def test_stacked_layers_on_a_mesh_match_one_device_and_save_per_layer(tmp_path):
  """Layers stored stacked (scan_layers' training layout) on a mesh: the step's loss and
  gradients equal the per-layer model's on one device, the expert axis stays sharded
  behind the stacked one, and the training state saves per layer, then restores stacked
  onto another mesh and per layer onto one device."""
  cfg, opt_cfg = _cfg().replace(n_layers=3, scan_layers=True), optim.OptimConfig()
  mesh, mesh_b = sharding.make_mesh(fsdp=2, expert=2, tensor=2), sharding.make_mesh(expert=8)
  model = llama.create(cfg, seed=1, mesh=mesh)
  batch = batches.lm_batch(8, 16)
  loss1, grads1 = _loss_and_grads(sharding.place(model, None), batch)
  stacked = sharding.place(layer_stack.stack_layers(model), mesh)
  w = stacked.layers.units[0].mlp.w_gate[...]
  assert w.shape[0] == 3 and w.sharding.spec[0] is None and w.sharding.spec[1] == "expert"
  spec = sharding.logical_to_spec(("batch", "length"), mesh_axes=mesh.axis_names)
  sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, spec)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    loss, grads = _loss_and_grads(stacked, sharded)
  np.testing.assert_allclose(float(loss), float(loss1), rtol=0, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               layer_stack.unstack_tree(_pure(grads)), _pure(grads1))

  opt = step.make_optimizer(stacked, opt_cfg, mesh)
  nnx.update(opt, jax.tree.map(lambda x: x + 1, nnx.state(opt)))  # non-zero moments
  want = layer_stack.unstack_tree(_pure(nnx.state((stacked, opt))))
  docs = [np.arange(40, dtype=np.int32) % 64] * 4
  data = iter(pipeline.packed_dataset(docs, 16, 8, 0))
  mngr = train_ckpt.manager(str(tmp_path / "state"), keep=1)
  loop._save(mngr, 1, nnx.state((stacked, opt)), data, {}, tokens_per_step=128)
  mngr.wait_until_finished()
  for layout, target_mesh in ((stacked, mesh_b), (model, None)):
    with nnx.use_eager_sharding(False):  # restore targets: shapes and logical names only
      graphdef, state = nnx.split(nnx.eval_shape(
          lambda m: (m, nnx.Optimizer(m, optim.make_tx(opt_cfg), wrt=nnx.Param)), layout))
    loop._restore(mngr, 1, state, data, target_mesh)
    jax.tree.map(np.testing.assert_array_equal, layer_stack.unstack_tree(_pure(state)), want)
  assert nnx.merge(graphdef, state)[0].layers[2].mlp.w_gate.shape == (8, 32, 16)
  mngr.close()


def test_mesh_shape_resolution():
  assert sharding.resolve_mesh_shape(8, expert=4, fsdp=-1) == dict(data=1, fsdp=2, expert=4,
                                                                    tensor=1)
  assert dict(sharding.make_mesh(data=-1, tensor=2).shape) == dict(data=4, fsdp=1, expert=1,
                                                                    tensor=2)
  for kw, msg in ((dict(data=-1, fsdp=-1), "mesh.fsdp=-1: only one axis may be -1"),
                  (dict(expert=3, data=-1), "mesh.data=-1: the other axes (mesh.expert=3 = 3 "
                                            "devices) do not divide the 8 devices"),
                  (dict(tensor=0), "mesh.tensor=0: expected a positive integer or -1")):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
      sharding.resolve_mesh_shape(8, **kw)


def test_the_expert_axis_shards_what_has_no_expert_dimension():
  """On an expert mesh, attention, embedding and router are split over the expert axis
  through their embed dimension (no whole replica per device), expert weights keep it on
  their expert dimension, and a size-1 axis is left out of a spec."""
  model = llama.create(_cfg(), seed=0, mesh=sharding.make_mesh(expert=8))
  d = _cfg().d_model
  for w in (model.layers[0].attn.wq[...], model.embed[...], model.layers[0].mlp.router[...]):
    assert {s.data.shape[w.shape.index(d)] for s in w.addressable_shards} == {d // 8}
  assert model.layers[0].mlp.w_gate[...].sharding.spec == P("expert", None, None)
  rules_spec = lambda names, shape, **mesh: sharding.logical_to_spec(
      names, mesh_shape=sharding.resolve_mesh_shape(8, **mesh), shape=shape)
  assert rules_spec(("embed", "heads"), (16, 4), fsdp=2, tensor=4) == P("fsdp", "tensor")
  assert rules_spec(("embed", "heads"), (16, 4), fsdp=2, expert=4) == P(("fsdp", "expert"), None)
  assert rules_spec(("expert", "embed"), (4, 16), fsdp=2, expert=4) == P("expert", "fsdp")


@pytest.mark.parametrize("overrides,msg", [
    (dict(expert=3), "mesh.expert=3 does not divide the 4 experts"),
    (dict(data=4, expert=4), "mesh.data=4: mesh data=4xfsdp=1xexpert=4xtensor=1 needs 16 "
                             "devices, have 8"),
    (dict(data=2, fsdp=2, expert=2, batch=4), "config.loop.batch_size=4 is not divisible by "
                                              "the 8 devices of the batch axes"),
], ids=["experts", "devices", "batch"])
def test_bad_mesh_fails_before_compiling(tmp_path, monkeypatch, overrides, msg):
  from configs import train as train_config  # pylint: disable=g-import-not-at-top
  config = train_config.get_config("scratch,runlocal")
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  config.loop.batch_size = overrides.pop("batch", 8)
  config.mesh.update(**overrides)
  monkeypatch.setattr(runs.init_plan.InitPlan, "build", lambda *_: pytest.fail("got past checks"))
  with pytest.raises(ValueError) as e:
    runs.train(config, str(tmp_path / "run"))
  assert msg in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("backend", ["pallas", "dropless", "capacity"])
def test_expert_parallel_dispatch_equals_one_device(backend, monkeypatch):
  """moe_forward under mesh expert=4 (4 of the fake devices) against one device with
  the same backend, outputs, router statistics and gradients. Under expert parallelism
  `pallas` runs the Pallas grouped matmul on each shard's local experts."""
  from moe_jax.moe import pallas_backend  # pylint: disable=g-import-not-at-top
  local = []
  real = pallas_backend.grouped_rows
  monkeypatch.setattr(pallas_backend, "grouped_rows", lambda *a: local.append(1) or real(*a))
  e, k, t, d, f = 8, 2, 24, 8, 6
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=f, backend=backend, capacity_factor=4.0)
  keys = jax.random.split(jax.random.key(5), 5)
  x = jax.random.normal(keys[0], (t, d))
  params = (jax.random.normal(keys[1], (d, e)), *(0.3 * jax.random.normal(kk, s) for kk, s in
            zip(keys[2:], [(e, d, f), (e, d, f), (e, f, d)])))

  def loss(x, *p):
    y, stats = layer.moe_forward(x, *p, cfg)
    return jnp.sum(jnp.sin(y)) + stats["aux_loss"] + stats["z_loss"], (y, stats)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
  (want_loss, (want_y, want_stats)), want_g = grad(x, *params)
  mesh = jax.make_mesh((4,), ("expert",), devices=jax.devices()[:4])
  put = lambda a, *spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, P(*spec)))
  sharded = (put(x, "expert"), put(params[0]), *(put(w, "expert") for w in params[1:]))
  with jax.set_mesh(mesh):
    assert expert_parallel.enabled(t)
    (got_loss, (got_y, got_stats)), got_g = grad(*sharded)
  assert bool(local) == (backend == "pallas")  # the kernels ran on the local experts
  np.testing.assert_allclose(got_loss, want_loss, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_y, want_y, atol=1e-5, rtol=1e-5)
  for key in ("aux_loss", "z_loss", "load_E", "probs_E", "router_entropy"):
    np.testing.assert_allclose(got_stats[key], want_stats[key], atol=1e-6, rtol=1e-6)
  for a, b in zip(got_g, want_g):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
