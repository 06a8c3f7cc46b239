"""Tiny random transformers models of each supported architecture, for reference checks."""
import numpy as np
import torch
import transformers

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 10000.0}
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def make_config(arch: str, **kw) -> transformers.PretrainedConfig:
  kw = {**COMMON, **kw}
  if arch == "llama":
    return transformers.LlamaConfig(rope_parameters=ROPE_LLAMA3, **kw)
  if arch == "mistral":
    return transformers.MistralConfig(sliding_window=8, **kw)
  if arch == "qwen2":
    return transformers.Qwen2Config(**kw)
  if arch == "qwen3":
    return transformers.Qwen3Config(head_dim=24, **kw)  # head_dim != d_model / heads
  raise ValueError(arch)


def make_model(arch: str, seed: int = 0, **kw) -> transformers.PreTrainedModel:
  """A random model with all weights (norms and biases too) perturbed to O(0.1-1)."""
  torch.manual_seed(seed)
  return perturb(transformers.AutoModelForCausalLM.from_config(make_config(arch, **kw),
                                                               dtype=torch.float32).eval())


def perturb(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
  """`model` with every weight redrawn at O(0.1-1): norms near 1, biases O(0.2), matrices
  N(0, 1/fan_in), so that mistakes anywhere show in the logits."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
  return model


def logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
