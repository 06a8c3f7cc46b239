"""Hidden states at each layer's FFN input, and the data-driven router inits built on them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import evaluate as eval_lib
from moe_jax.data import corpus
from moe_jax.models import llama
from moe_jax.upcycle import router_init


def mlp_inputs(model, tokens_BxL: jax.Array) -> list[jax.Array]:
  """[B, L, D] inputs of every layer's FFN (after its RMSNorm), read through the model's
  own forward pass (`llama.capture`)."""
  _, captured = llama.capture(model, jnp.asarray(tokens_BxL))
  return [captured[i]["ffn_input"] for i in range(len(model.layers))]


def layer_states(model, windows_NxL: np.ndarray) -> list[np.ndarray]:
  """Per layer, all FFN-input vectors of the windows, [N*L, D] float32."""
  per_window = [mlp_inputs(model, w[None]) for w in windows_NxL]
  return [np.concatenate([np.asarray(s[i][0], np.float32) for s in per_window])
          for i in range(len(model.layers))]


def prompt_directions(model, prompt_ids: list[list[int]]) -> list[np.ndarray]:
  """Per layer, [P, D]: each prompt's mean FFN-input state (mergekit's "hidden" init)."""
  states = [mlp_inputs(model, np.asarray(ids)[None]) for ids in prompt_ids]
  return [np.stack([np.asarray(s[i][0], np.float32).mean(0) for s in states])
          for i in range(len(model.layers))]


def data_routers(kind: str, model, tok, spec, layer_ids, *, seed: int = 0, std: float = 0.02,
                 calib_windows: int = 4, hidden_prompts: str = "",
                 prompts_key: str = "config.hidden_prompts") -> dict[int, np.ndarray] | None:
  """Per MoE layer, the [D, E] router a data-driven `kind` gives (None for the drawn
  kinds): 'kmeans' clusters the FFN inputs of `calib_windows` windows of the held-out
  stdlib text; 'hidden' uses one '|'-separated prompt per router column (mergekit)."""
  if kind not in ("kmeans", "hidden"):
    return None
  d, repeat = model.cfg.d_model, spec.granularity if spec.method == "virtual_group" else 1
  rng = np.random.default_rng(seed)
  init = lambda **kw: router_init.init_router(kind, d, spec.num_experts, rng, std=std,
                                              repeat=repeat, **kw)
  if kind == "kmeans":
    text = "\n".join(corpus.stdlib_documents("valid"))
    windows = eval_lib.make_windows(tok.encode(text), 256, calib_windows, "calibration text")
    states = layer_states(model, windows)
    return {i: init(hidden_NxD=states[i]) for i in layer_ids}
  prompts = [p for p in hidden_prompts.split("|") if p.strip()]
  if len(prompts) != spec.num_experts // repeat:
    raise ValueError(f"{prompts_key}: {len(prompts)} prompts, expected "
                     f"{spec.num_experts // repeat} (one per router column)")
  dirs = prompt_directions(model, [tok.encode(p) for p in prompts])
  return {i: init(directions_RxD=dirs[i] - dirs[i].mean(0, keepdims=True)) for i in layer_ids}
