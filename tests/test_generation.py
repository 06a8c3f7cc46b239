"""Generation with a KV cache against the full-forward reference (generate_uncached), on
dense, MoE, attention-expert and sliding-window models; batching; stopping; sampling.
The cache of shared-KV attention experts has no expert axis: one cache for all."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import generation
from moe_jax.config import ModelConfig
from moe_jax.models import llama
from moe_jax.moe.attention import MoaConfig
from moe_jax.moe.config import MoeConfig

# SmolLM2's layout in small: tied embeddings, 3 query heads per KV head. On SmolLM2 itself
# experiments/bench_generate.py checks 256 tokens, and 64 on its 8-expert upcycle of
# every layer (docs/results/generate_smollm2.json).
BASE = dict(vocab_size=64, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8,
            ffn_dim=48, tie_embeddings=True)
MODELS = {  # each path once: MoE FFN, attention experts, parallel block, sliding window
    "dense": {},
    "bam_expert_kv_moe": dict(moa=MoaConfig(3), block="parallel", moe=MoeConfig(
        num_experts=4, top_k=2, expert_dim=16, backend="dropless", layers="1")),
    "bam_shared_kv_window": dict(moa=MoaConfig(3, shared_kv=True), sliding_window=5),
}
PROMPTS = [[3, 4, 5, 6, 7], [9, 10], list(range(1, 16))]  # one prompt width: one compile


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
  return llama.create(ModelConfig(**BASE, **MODELS[request.param]), seed=1)


def test_cached_equals_uncached_and_batched_equals_one_at_a_time(model):
  want = [generation.generate_uncached(model, p, 16) for p in PROMPTS]
  assert [generation.generate(model, [p], 16)[0] for p in PROMPTS] == want
  assert generation.generate(model, PROMPTS, 16) == want  # left-padded to one width
  cfg = model.cfg
  experts = (cfg.moa.num_experts,) if cfg.moa and not cfg.moa.shared_kv else ()
  assert [k.shape for k, _ in model.init_cache(3, 40).kv] == [(3, 40, *experts, 2, 8)] * 2


def test_eos_ends_a_row_and_is_not_returned():
  model = llama.create(ModelConfig(**BASE), seed=1)
  free = generation.generate(model, PROMPTS, 16)
  eos = free[0][3]  # a token the first row emits
  got = generation.generate(model, PROMPTS, 16, eos_id=eos, chunk=5)  # the last chunk short
  for row, full, prompt in zip(got, free, PROMPTS):
    cut = full.index(eos) if eos in full else len(full)
    assert row == full[:cut] == generation.generate_uncached(model, prompt, 16, eos)


class _CharTokenizer:
  """Token i is chr(ord('a') + i % 26): enough to test stop strings."""
  eos_id = None

  def encode(self, text):
    return [ord(c) - ord("a") for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_cut_the_text_and_end_the_row():
  model = llama.create(ModelConfig(**BASE), seed=1)
  tok = _CharTokenizer()
  free = generation.generate_text(model, tok, ["abc", "xy"], 40)
  stop = free[0][5:7]
  calls = []
  stop_fn_rows = generation.generate(
      model, [tok.encode("abc"), tok.encode("xy")], 40, chunk=8,
      stop_fn=lambda i, row: calls.append(i) or stop in tok.decode(row))
  got = generation.generate_text(model, tok, ["abc", "xy"], 40, stop=[stop], chunk=8)
  assert got[0] == free[0][:free[0].index(stop)]
  assert got[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])
  assert len(stop_fn_rows[0]) <= 8 * (5 // 8 + 2)  # row 0 stopped within a chunk of its hit
  assert calls  # checked between chunks


def test_sampling_cuts():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 4000))
  draw = lambda s, seed=0: np.asarray(generation.sample(logits, jax.random.key(seed), s))
  assert set(draw(generation.Sampling(1.0, top_k=1))) == {1}
  assert set(draw(generation.Sampling(1.0, top_k=2))) == {1, 3}
  nucleus = draw(generation.Sampling(1.0, top_p=0.7))  # 0.5 + 0.3 reach 0.7
  assert set(nucleus) == {1, 3}
  assert abs((nucleus == 1).mean() - 0.5 / 0.8) < 0.03
  full = draw(generation.Sampling(1.0))
  np.testing.assert_allclose(np.bincount(full, minlength=4) / 4000, [0.05, 0.5, 0.15, 0.3],
                             atol=0.03)
  cold = draw(generation.Sampling(0.05))  # low temperature: nearly greedy
  assert (cold == 1).mean() > 0.99
  assert (draw(generation.Sampling(1.0), 1) != full).any()  # another key, another draw
  np.testing.assert_array_equal(draw(generation.Sampling(1.0)), full)


def test_sampled_generation_is_reproducible_and_greedy_at_top_k_1():
  model = llama.create(ModelConfig(**BASE), seed=1)
  s = generation.Sampling(1.0, top_k=8, top_p=0.9)
  a = generation.generate(model, PROMPTS, 16, sampling=s, key=jax.random.key(3))
  assert a == generation.generate(model, PROMPTS, 16, sampling=s, key=jax.random.key(3))
  assert a != generation.generate(model, PROMPTS, 16, sampling=s, key=jax.random.key(4))
  assert generation.generate(model, PROMPTS, 16, sampling=generation.Sampling(1.0, top_k=1),
                             key=jax.random.key(3)) == generation.generate(model, PROMPTS, 16)


def test_bad_arguments_are_one_line():
  model = llama.create(ModelConfig(**BASE), seed=1)
  for kwargs, msg in ((dict(sampling=generation.Sampling(1.0)), "key: sampling at"),
                      (dict(max_new_tokens=0), "max_new_tokens=0"),):
    with pytest.raises(ValueError, match=msg):
      generation.generate(model, PROMPTS, **kwargs)
  with pytest.raises(ValueError, match="prompts: expected"):
    generation.generate(model, [[1], []], 4)
  for kwargs, msg in ((dict(temperature=-1.0), "temperature=-1.0"), (dict(top_k=-2), "top_k=-2"),
                      (dict(top_p=0.0), "top_p=0.0")):
    with pytest.raises(ValueError, match=msg):
      generation.Sampling(**kwargs)
