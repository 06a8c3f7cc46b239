"""MoE config keys under every name transformers gives them (hf.KEY_ALIASES)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
from moe_jax.convert import hf, load

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MOE = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeConfig,
                  dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, mlp_only_layers=[0])),
    "qwen3_moe": (transformers.Qwen3MoeConfig,
                  dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                       head_dim=8, norm_topk_prob=True)),
}
# (num_experts, top_k, expert_dim, layers) of each MOE config.
EXPECTED = {"mixtral": (4, 2, 48, "all"), "qwen2_moe": (6, 2, 16, "1"),
            "qwen3_moe": (8, 3, 16, "all")}
HUB_QWEN3_MOE = {  # as the hub's Qwen3-MoE config.json files are written
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "use_sliding_window": False, "sliding_window": None, "decoder_sparse_step": 1,
    "moe_intermediate_size": 768, "mlp_only_layers": [], "norm_topk_prob": True,
    "num_experts": 128, "num_experts_per_tok": 8, "torch_dtype": "bfloat16",
}


def _save_config(tmp_path, cfg: dict) -> str:
  path = tmp_path / "hf"
  path.mkdir(exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  return str(path)


def _renamed(cfg: dict, old: str, new: str) -> dict:
  return {(new if k == old else k): v for k, v in cfg.items()}


@pytest.mark.parametrize("arch", sorted(MOE))
def test_config_written_by_transformers(arch, tmp_path):
  cls, moe = MOE[arch]
  cls(**SMALL, **moe).save_pretrained(str(tmp_path))
  cfg = hf.read_hf_config(str(tmp_path))
  got = (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_dim, cfg.moe.layers)
  assert (cfg.arch, cfg.n_layers, got) == (arch, 2, EXPECTED[arch])


def test_pinned_transformers_writes_num_local_experts_for_qwen3_moe():
  written = transformers.Qwen3MoeConfig(**SMALL, num_experts=8).to_dict()
  assert written["num_local_experts"] == 8 and "num_experts" not in written


def test_hub_and_local_experts_names_agree(tmp_path):
  hub = hf.config_from_hf(HUB_QWEN3_MOE)
  local = hf.config_from_hf(_renamed(HUB_QWEN3_MOE, "num_experts", "num_local_experts"))
  both = hf.config_from_hf({**HUB_QWEN3_MOE, "num_local_experts": 128})
  assert hub == local == both and hub.moe.num_experts == 128 and hub.moe.top_k == 8
  mixtral = {**HUB_QWEN3_MOE, "model_type": "mixtral"}
  assert (hf.config_from_hf(mixtral).moe
          == hf.config_from_hf(_renamed(mixtral, "num_experts", "num_local_experts")).moe)


def _tiny_qwen3_moe(path: str, seed: int = 0):
  """A saved random Qwen3-MoE (2 layers, hidden 32), weights perturbed to O(0.1-1)."""
  cls, moe = MOE["qwen3_moe"]
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cls(**SMALL, **moe),
                                                        dtype=torch.float32).eval()
  hf_models.perturb(model).save_pretrained(path)
  return model


@pytest.mark.parametrize("key", ["num_local_experts", "num_experts"])
def test_qwen3_moe_imports_under_either_key(key, tmp_path):
  path = str(tmp_path / "qwen3_moe")
  ref = _tiny_qwen3_moe(path)
  cfg_file = tmp_path / "qwen3_moe" / "config.json"
  cfg = json.loads(cfg_file.read_text())
  n = cfg.pop("num_local_experts", None) or cfg.pop("num_experts")
  cfg_file.write_text(json.dumps({**cfg, key: n}))
  model, _ = load.load_model(path)
  assert model.cfg.moe.num_experts == 8
  tokens = np.random.RandomState(0).randint(0, SMALL["vocab_size"], (2, 16))
  theirs = hf_models.logits(ref, tokens)
  assert np.std(theirs) > 0.3
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))[0]), theirs, atol=1e-4, rtol=0)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_models.logits(reloaded, tokens), theirs, atol=1e-6, rtol=0)


def test_conflicting_names_one_line_error(tmp_path):
  path = _save_config(tmp_path, {**HUB_QWEN3_MOE, "num_local_experts": 64})
  with pytest.raises(ValueError) as e:
    hf.read_hf_config(path)
  msg = str(e.value)
  assert len(msg.splitlines()) == 1 and msg.startswith(f"{path}/config.json: ")
  assert "num_experts=128" in msg and "num_local_experts=64" in msg


def test_missing_key_names_the_canonical_key(tmp_path):
  no_experts = {k: v for k, v in HUB_QWEN3_MOE.items() if k != "num_experts"}
  path = _save_config(tmp_path, {**no_experts, "model_type": "mixtral"})
  with pytest.raises(ValueError, match=r"config.json: missing key 'num_experts'$"):
    hf.read_hf_config(path)
