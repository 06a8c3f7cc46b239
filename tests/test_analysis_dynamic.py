"""llama.capture (intermediates read through the model's own forward pass) and the dynamic
analyses of moe_jax/analysis/dynamic.py, cross-checked against transformers' Mixtral."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
from flax import nnx
from scipy.spatial.distance import jensenshannon

from moe_jax.analysis import dynamic
from moe_jax.config import ModelConfig
from moe_jax.convert import load
from moe_jax.models import layers, llama
from moe_jax.moe import routers
from moe_jax.moe.config import MoeConfig
from moe_jax.upcycle import calibrate

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  ffn_dim=48, moe=MoeConfig(num_experts=4, top_k=2, expert_dim=16, layers="1,2"))


def reference_ffn_inputs(model, tokens_BxL):
  """The decoder block re-implemented by hand (what calibrate.mlp_inputs used to do)."""
  cfg = model.cfg
  positions = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
  mask = layers.attention_mask(jnp.ones_like(tokens_BxL), cfg.sliding_window)
  inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
  x = jnp.take(model.embed[...], tokens_BxL, axis=0)
  out = []
  for block in model.layers:
    x = x + block.attn(layers.rms_norm(x, block.attn_norm[...], cfg.rms_eps), positions, mask,
                       inv_freq)[0]
    h = layers.rms_norm(x, block.mlp_norm[...], cfg.rms_eps)
    out.append(h)
    x = x + block.mlp(h)[0]
  return out


@pytest.fixture(scope="session")
def moe_model():
  return llama.create(CFG, seed=0)


TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 10)))
forward = nnx.jit(lambda model, tokens: model(tokens)[0])


def test_capture_equals_reference_and_leaves_logits(moe_model):
  tokens = TOKENS
  logits, captured = llama.capture(moe_model, tokens)
  np.testing.assert_allclose(logits, forward(moe_model, tokens), atol=1e-5, rtol=0)
  want = nnx.jit(reference_ffn_inputs)(moe_model, tokens)
  assert sorted(captured) == [0, 1, 2] and set(captured[0]) == {"ffn_input"}
  for i in range(3):
    np.testing.assert_allclose(captured[i]["ffn_input"], want[i], atol=1e-5, rtol=0)
  for i, h in enumerate(calibrate.mlp_inputs(moe_model, tokens)):
    np.testing.assert_array_equal(h, captured[i]["ffn_input"])
  for i in (1, 2):  # what MoE layers record is what routers.route gives on the ffn input
    got, mlp = captured[i], moe_model.layers[i].mlp
    logits_TxE = got["ffn_input"].reshape(-1, 32) @ mlp.router[...]
    np.testing.assert_allclose(got["router_logits"].reshape(-1, 4), logits_TxE, atol=1e-5)
    route = routers.route(logits_TxE, CFG.moe)
    np.testing.assert_array_equal(got["experts"].reshape(-1, 2), route.experts_TxK)
    np.testing.assert_allclose(got["router_probs"].reshape(-1, 4), route.probs_TxE, atol=1e-6)
    np.testing.assert_allclose(got["expert_weights"].reshape(-1, 2), route.weights_TxK, atol=1e-6)
    assert got["experts"].shape == (2, 10, 2) and got["router_probs"].shape == (2, 10, 4)


def test_capture_adds_no_state(moe_model):
  """Params, the state checkpoints save and plain (jitted) calls are untouched."""
  before = jax.tree.map(np.asarray, nnx.state(moe_model))
  llama.capture(moe_model, TOKENS)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    forward(moe_model, TOKENS[:, :4])  # a fresh trace of the plain call
  assert not [w for w in caught if "sow" in str(w.message)]
  assert not nnx.state(moe_model, nnx.Intermediate)
  after = jax.tree.map(np.asarray, nnx.state(moe_model))
  assert jax.tree.structure(after) == jax.tree.structure(before)
  jax.tree.map(np.testing.assert_array_equal, after, before)


SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
HF_MOE = {  # (config class, MoE keys, the MoE layers, the experts' width)
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2),
                (0, 1), 48),
    "qwen2_moe": (transformers.Qwen2MoeConfig,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, mlp_only_layers=[0]), (1,), 16),
    "qwen3_moe": (transformers.Qwen3MoeConfig,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       head_dim=8, norm_topk_prob=True), (0, 1), 16),
}


def _hf_moe(arch, path):
  """A tiny random transformers MoE of `arch` (2 layers, hidden 32, 4 experts), saved."""
  torch.manual_seed(0)
  config_cls, moe_kw, _, _ = HF_MOE[arch]
  model = transformers.AutoModelForCausalLM.from_config(config_cls(**SMALL, **moe_kw),
                                                        dtype=torch.float32).eval()
  hf_models.perturb(model).save_pretrained(path)
  return model


@pytest.mark.parametrize("arch", sorted(HF_MOE))
def test_expert_outputs_match_transformers(arch, tmp_path):
  hf_model = _hf_moe(arch, str(tmp_path / arch))
  moe_ids, width = HF_MOE[arch][2], HF_MOE[arch][3]
  ours, _ = load.load_model(str(tmp_path / arch))
  assert ours.cfg.moe_layer_ids == moe_ids
  tokens = np.random.RandomState(1).randint(0, 97, (2, 9))
  seen = {}
  hooks = [hf_model.model.layers[i].mlp.register_forward_pre_hook(
      lambda m, args, i=i: seen.__setitem__(i, args[0].detach().numpy().copy())) for i in moe_ids]
  theirs = hf_model(torch.as_tensor(tokens)).logits.detach().numpy()
  for h in hooks:
    h.remove()
  logits, captured = llama.capture(ours, jnp.asarray(tokens))
  np.testing.assert_allclose(logits, theirs, atol=1e-4, rtol=0)
  for i in moe_ids:
    x_TxD = np.asarray(captured[i]["ffn_input"]).reshape(-1, 32)
    np.testing.assert_allclose(x_TxD, seen[i].reshape(-1, 32), atol=1e-5, rtol=0)
    mlp = ours.layers[i].mlp
    weights = [np.asarray(w[...]) for w in (mlp.w_gate, mlp.w_up, mlp.w_down)]
    assert weights[0].shape == (4, 32, width)
    got_ExTxD = dynamic.expert_outputs(x_TxD, *weights, chunk=5)  # 18 tokens: 4 blocks
    experts, x = hf_model.model.layers[i].mlp.experts, torch.tensor(x_TxD)
    with torch.no_grad():  # expert e alone, weight 1, on every token (no shared expert)
      want_ExTxD = np.stack([experts(x, torch.full((18, 1), e), torch.ones(18, 1)).numpy()
                             for e in range(4)])
    assert np.abs(want_ExTxD).max() > 0.1
    np.testing.assert_allclose(got_ExTxD, want_ExTxD, atol=1e-5, rtol=0)
    np.testing.assert_allclose(dynamic.output_norms(x_TxD, *weights, chunk=7),
                               np.linalg.norm(want_ExTxD, axis=-1).T, atol=1e-5)


def _cosine_rows(a_ExN):
  a = a_ExN / np.linalg.norm(a_ExN, axis=1, keepdims=True)
  return a @ a.T


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_static_analysis_of_hf_checkpoints_reads_transformers_experts(arch, tmp_path):
  """The analysis job on an HF directory, layer by layer: its weight and router cosines are
  those of transformers' own expert tensors (flattened gate_up / down, router rows)."""
  from configs import analyze as analyze_config  # pylint: disable=g-import-not-at-top
  from moe_jax import runs  # pylint: disable=g-import-not-at-top
  hf_model = _hf_moe(arch, str(tmp_path / arch))
  c = analyze_config.get_config()
  c.update(checkpoint=str(tmp_path / arch), windows=0)
  result = runs.analyze(c, str(tmp_path / "out"))
  assert sorted(int(i) for i in result["layers"]) == list(HF_MOE[arch][2])
  for i, d in result["layers"].items():
    block = hf_model.model.layers[int(i)].mlp
    gate_up = block.experts.gate_up_proj.detach().numpy()  # [E, 2F, D]: gate rows, then up
    f = gate_up.shape[1] // 2
    want = {"w_gate": gate_up[:, :f], "w_up": gate_up[:, f:],
            "w_down": block.experts.down_proj.detach().numpy()}
    for m, w in want.items():
      np.testing.assert_allclose(d["weight_cosine"][m], _cosine_rows(w.reshape(4, -1)),
                                 atol=1e-5, err_msg=m)
    router_ExD = block.gate.weight.detach().numpy()
    np.testing.assert_allclose(d["router_cosine"], _cosine_rows(router_ExD), atol=1e-5)
  assert os.path.isfile(tmp_path / "out" / "report.md")


def test_output_similarity():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(37, 8))
  wg, wu, wd = rng.normal(size=(3, 8, 6)), rng.normal(size=(3, 8, 6)), rng.normal(size=(3, 6, 8))
  wg[1], wu[1], wd[1] = wg[0], wu[0], -wd[0]          # expert 1 = -expert 0
  sim = dynamic.output_similarity(x, wg, wu, wd, dense=(wg[0], wu[0], 2 * wd[0]), chunk=10)
  out = dynamic.expert_outputs(x, wg, wu, wd)
  cos = dynamic.token_cosines(out)
  np.testing.assert_allclose(sim["cosine"], cos.mean(0), atol=1e-12)
  np.testing.assert_allclose(sim["angular"], dynamic.angular_similarity(cos).mean(0), atol=1e-12)
  np.testing.assert_allclose(np.diag(sim["cosine"]), 1.0)
  np.testing.assert_allclose([sim["cosine"][0, 1], sim["angular"][0, 1]], [-1.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(sim["dense_cosine"][:2], [1.0, -1.0], atol=1e-12)
  np.testing.assert_allclose(sim["dense_angular"][:2], [1.0, 0.0], atol=1e-6)
  assert -1 < sim["cosine"][0, 2] < 1


def test_rank_cooccurrence_known():
  norms = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
  scores = np.array([[0.5, 0.2, 0.3], [0.6, 0.3, 0.1]])
  # token 0: norm and score ranks agree (0, 2, 1); token 1: norm (2, 1, 0), score (0, 1, 2)
  np.testing.assert_array_equal(dynamic.rank_cooccurrence(norms, scores),
                                [[1, 0, 1], [0, 2, 0], [1, 0, 1]])
  assert dynamic.top1_max_norm_fraction(norms, scores) == 0.5
  np.testing.assert_array_equal(dynamic.descending_ranks([[1.0, 1.0, 2.0]]), [[1, 2, 0]])


def test_js_divergence_matches_scipy():
  rng = np.random.default_rng(0)
  for _ in range(5):
    p, q = rng.random(8), rng.random(8)
    p[rng.integers(8)] = 0.0
    assert dynamic.js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2,
                                                        abs=1e-12)
  assert dynamic.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
  assert dynamic.js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-15)
  m = dynamic.js_matrix([np.array([1.0, 0]), np.array([0, 1.0]), np.array([1.0, 1.0])])
  np.testing.assert_allclose(m, m.T)
  np.testing.assert_allclose(np.diag(m), 0.0, atol=1e-15)


def test_routing_statistics():
  experts = np.array([[0, 1], [0, 2], [3, 0]])
  np.testing.assert_allclose(dynamic.expert_load(experts, 4), [3 / 6, 1 / 6, 1 / 6, 1 / 6])
  assert dynamic.load_entropy(np.full(4, 0.25)) == pytest.approx(2.0)
  assert dynamic.load_entropy([0, 1, 0]) == 0.0
  loads = dynamic.domain_loads({"code": experts, "text": experts[:1]}, 4)
  np.testing.assert_allclose(loads["text"], [0.5, 0.5, 0, 0])
  a, b = np.array([[0, 1], [2, 3], [1, 0]]), np.array([[1, 0], [2, 1], [1, 0]])
  assert dynamic.same_set_fraction(a, b) == pytest.approx(2 / 3)
  assert dynamic.same_top1_fraction(a, b) == pytest.approx(2 / 3)
  agree = dynamic.layer_agreement({3: b, 1: a, 5: b})
  assert agree == {(1, 3): {"same_set": pytest.approx(2 / 3), "same_top1": pytest.approx(2 / 3)},
                   (3, 5): {"same_set": 1.0, "same_top1": 1.0}}


def test_active_fraction():
  x = np.array([[1.0], [-20.0], [0.0]])
  wg = np.array([[[1.0, 1.0]], [[0.0, 1.0]]])            # [E=2, D=1, F=2]
  # |silu| > 1e-3: expert 0 on token 0 (both neurons); expert 1 on token 0 (neuron 1)
  np.testing.assert_allclose(dynamic.active_fraction(x, wg, chunk=2), [2 / 6, 1 / 6])
  routed = np.array([[0], [1], [0]])
  np.testing.assert_allclose(dynamic.active_fraction(x, wg, experts_TxK=routed), [2 / 4, 0.0])
  np.testing.assert_array_equal(np.isnan(dynamic.active_fraction(x, wg, experts_TxK=routed * 0)),
                                [False, True])


def test_one_pass_stats_equal_the_separate_functions():
  rng = np.random.default_rng(3)
  e, d, f, t = 3, 8, 12, 37
  x = rng.normal(size=(t, d)).astype(np.float32)
  w = (rng.normal(size=(e, d, f)), rng.normal(size=(e, d, f)), rng.normal(size=(e, f, d)))
  dense = (rng.normal(size=(d, f)), rng.normal(size=(d, f)), rng.normal(size=(f, d)))
  got = dynamic.expert_output_stats(x, *w, dense=dense, chunk=10)
  sim = dynamic.output_similarity(x, *w, dense=dense, chunk=16)
  for k, v in sim.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-9, err_msg=k)
  np.testing.assert_allclose(got["norms"], dynamic.output_norms(x, *w), rtol=1e-6)
  np.testing.assert_allclose(got["active"], dynamic.active_fraction(x, w[0]), rtol=1e-12)
