"""Scanned layers (config.scan_layers) and activation rematerialisation (config.remat):
the same loss and gradients as the Python loop without remat, for dense, MoE (every
other layer) and attention-expert blocks; the scan's repeating unit; and, scanned, less
temporary memory with remat in the compiled train step (memory_analysis; the full-size
figures come from experiments.bench_memory)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.models import layer_stack, llama
from moe_jax.moe.attention import MoaConfig
from moe_jax.moe.config import MoeConfig
from moe_jax.train import step

MOE = MoeConfig(num_experts=4, top_k=2, expert_dim=16, backend="dropless", jitter=0.1,
                layers="every:2")
CFGS = {"dense": ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1,
                             head_dim=16, ffn_dim=64, max_seq_len=32)}
CFGS["moe_moa_parallel"] = CFGS["dense"].replace(moe=MOE, moa=MoaConfig(2), block="parallel")


def _batch(rows=4, length=24):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (rows, length + 1)).astype(np.int32)
  return jax.tree.map(jnp.asarray, {
      "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
      "loss_mask": np.ones((rows, length), np.float32),
      "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
      "segment_ids": np.ones((rows, length), np.int32)})


@nnx.jit
def _loss_and_grads(model, batch, key):
  return nnx.value_and_grad(lambda m: step.loss_fn(m, batch, key=key), has_aux=True)(model)


@pytest.mark.parametrize("name", sorted(CFGS))
@pytest.mark.parametrize("scan,remat", [(False, "full"), (False, "save_dots"), (True, "none"),
                                        (True, "full"), (True, "save_dots"),
                                        ("stacked", "none"), ("stacked", "full")])
def test_scan_and_remat_give_the_loss_and_gradients_of_the_plain_loop(name, scan, remat):
  """scan: the layers stored per layer, stacked inside the step; "stacked": stored stacked
  (layer_stack.stack_layers, the train step's layout), gradients compared per layer."""
  batch, key = _batch(), jax.random.key(1)  # jitter: the same draw in the recomputation
  (want, want_aux), want_g = _loss_and_grads(llama.create(CFGS[name], seed=2), batch, key)
  model = llama.create(CFGS[name].replace(remat=remat, scan_layers=bool(scan)), seed=2)
  if scan == "stacked":
    model = layer_stack.stack_layers(model)
  (got, got_aux), got_g = _loss_and_grads(model, batch, key)
  got_g = layer_stack.unstack_tree(nnx.to_pure_dict(got_g))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in ("ce", "aux_loss", "z_loss"):
    np.testing.assert_allclose(got_aux[k], want_aux[k], rtol=1e-6, atol=1e-9)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got_aux["moe"], want_aux["moe"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got_g, nnx.to_pure_dict(want_g))


def _pure(model):
  return nnx.to_pure_dict(nnx.state(model))


def test_stacked_layers_hold_each_layers_params_and_unstack_back():
  """5 layers of period 2: two stacked units of 2 rows and a tail of 1; the stack's pure
  dict unstacks to the per-layer model's (arrays and abstract arrays) and restacks."""
  model = llama.create(CFGS["moe_moa_parallel"].replace(n_layers=5, scan_layers=True), seed=3)
  stacked = layer_stack.stack_layers(model)
  assert (stacked.layers.period, stacked.layers.repeats, len(stacked.layers.tail)) == (2, 2, 1)
  assert stacked.layers.units[1].mlp.w_gate.shape[0] == 2
  assert stacked.layers.units[1].mlp.w_gate.get_metadata()["out_sharding"][0] == "layers"
  per_layer = _pure(model)
  tree_equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  tree_equal(_pure(layer_stack.unstack_layers(stacked)), per_layer)
  tree_equal(layer_stack.unstack_tree(_pure(stacked)), per_layer)
  tree_equal(layer_stack.stack_tree(per_layer, _pure(stacked)), _pure(stacked))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _pure(stacked))
  shapes = jax.tree.map(lambda x: x.shape, layer_stack.unstack_tree(abstract))
  assert shapes == jax.tree.map(lambda x: x.shape, per_layer)
  tokens = jnp.arange(12, dtype=jnp.int32)[None] % 64
  np.testing.assert_allclose(stacked(tokens)[0], model(tokens)[0], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="unstack_layers"):
    stacked.init_cache(1, 8)


def test_router_biases_update_the_same_stacked_or_per_layer():
  """sigmoid_bias routing (DeepSeek-V3 balancing): one train step moves every layer's
  router bias by the same amount whether the layers are stored stacked or not."""
  from moe_jax.train import loop, optim  # pylint: disable=g-import-not-at-top
  moe = dataclasses.replace(MOE, router="sigmoid_bias", layers="all", bias_update_rate=0.1,
                            jitter=0.0)
  cfg = CFGS["dense"].replace(moe=moe, n_layers=4, scan_layers=True)
  batch = _batch()
  after = []
  for stack in (False, True):
    model = llama.create(cfg, seed=4)
    model = layer_stack.stack_layers(model) if stack else model
    opt = step.make_optimizer(model, optim.OptimConfig(lr=1e-2, total_steps=2, warmup_steps=1))
    step.train_step(model, opt, batch, jax.random.key(0), jnp.float32(1e-2))
    after.append(_pure(layer_stack.unstack_layers(model)))
  biases = [np.stack([t["layers"][i]["mlp"]["router_bias"] for i in range(4)]) for t in after]
  assert np.abs(biases[0]).max() > 0
  np.testing.assert_array_equal(biases[1], biases[0])  # the sign of the same loads


def test_the_scan_unit_is_the_shortest_repeating_run_of_layers():
  assert layer_stack.scan_period(list("aaaa")) == 1
  assert layer_stack.scan_period(list("abababa")) == 2  # the last 'a' runs after the scan
  assert layer_stack.scan_period(list("aabaab")) == 3
  assert layer_stack.scan_period(list("abcd")) == 0 and layer_stack.scan_period(list("a")) == 0
  cfg = CFGS["moe_moa_parallel"].replace(n_layers=5, scan_layers=True)
  graphdefs = [nnx.split(b)[0] for b in llama.create(cfg).layers]
  assert layer_stack.scan_period(graphdefs) == 2


def test_remat_in_the_scan_needs_less_temporary_memory():
  """The loop's remat does not lower XLA CPU's temporary bytes (its scheduler keeps the
  recomputed activations live); in the scan only each unit's input is saved."""
  cfg = CFGS["dense"].replace(n_layers=6, max_seq_len=256, scan_layers=True)
  batch = _batch(rows=8, length=256)
  temp = {}
  for remat in ("none", "full"):
    model = llama.create(cfg.replace(remat=remat), seed=0)
    compiled = _loss_and_grads.lower(model, batch, jax.random.key(0)).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["full"] < 0.5 * temp["none"], temp


def test_an_unknown_remat_is_one_line():
  with pytest.raises(ValueError, match=r"model.remat='some': expected one of \('none', 'full', 'save_dots'\)"):
    CFGS["dense"].replace(remat="some")


def test_a_scanned_remat_run_trains_like_the_loop_and_its_checkpoint_loads_either_way(tmp_path):
  """train with scan_layers and remat: the logged losses of the plain loop (4 AdamW steps
  of an MoE from scratch), a checkpoint that loads into the unscanned model with the
  same logits, and a resume that may switch both off (the same function)."""
  from configs import train as train_config  # pylint: disable=g-import-not-at-top
  from moe_jax import metrics, runs, sweep  # pylint: disable=g-import-not-at-top
  from moe_jax.convert import load  # pylint: disable=g-import-not-at-top

  def config(steps, **kw):
    c = sweep.apply(train_config.get_config("scratch,runlocal,experts=2"),
                    {"data.max_docs": 10, "loop.steps": steps, "loop.batch_size": 2,
                     "loop.seq_len": 32, "loop.eval_batches": 0, "loop.ckpt_every": 4,
                     "loop.log_every": 1, "optim.lr": 3e-3, "mesh.fsdp": 1, **kw})
    return c

  runs.train(config(4), str(tmp_path / "loop"))
  runs.train(config(4, scan_layers=True, remat="full"), str(tmp_path / "scan"))
  losses = lambda d: [r["loss"] for r in metrics.read(str(tmp_path / d)) if "loss" in r]
  np.testing.assert_allclose(losses("scan"), losses("loop"), rtol=1e-5)
  scanned = load.open_source(str(tmp_path / "scan"))
  assert scanned.cfg.scan_layers and scanned.cfg.remat == "full"
  tokens = jnp.asarray(np.arange(16, dtype=np.int32)[None] % scanned.cfg.vocab_size)
  want = load.open_source(str(tmp_path / "loop")).model()(tokens)[0]
  np.testing.assert_allclose(scanned.model(scan_layers=False)(tokens)[0], want, rtol=1e-4,
                             atol=1e-5)
  runs.train(config(6), str(tmp_path / "scan"))  # resumed without scan or remat
  assert len(losses("scan")) == 6
  runs.train(config(6, scan_layers=True), str(tmp_path / "loop"))  # and the other way
  np.testing.assert_allclose(losses("loop"), losses("scan"), rtol=1e-5)
