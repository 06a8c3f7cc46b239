"""The final record's held-out score: loop.final_eval=split scores every token of the
held-out split once (checked against each document run alone through the model), and a
finished run scored on a sample of batches is scored again from its checkpoint exactly as
a run trained with the split scoring is."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from configs import train as train_config
from moe_jax import runs, study
from moe_jax.config import ModelConfig
from moe_jax.data import corpus
from moe_jax.models import llama

L = 16  # seq_len: every synthetic document is one packed row of L + 1 tokens


def _config(final_eval, batch_size=4, eval_batches=1):
  c = train_config.get_config("scratch,runlocal")
  c.data.source = "docs.jsonl"  # not the embedded text: no per-domain scores
  c.loop.update(seq_len=L, batch_size=batch_size, eval_batches=eval_batches,
                final_eval=final_eval)
  return c


def _own_nll(model, doc):
  """Mean next-token NLL of one document run alone, in numpy from the logits."""
  tokens = jnp.asarray(doc[None, :-1])
  logits, _ = model(tokens, jnp.arange(L)[None], jnp.ones_like(tokens), train=False)
  logp = special.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
  return -logp[np.arange(L), doc[1:]]


def test_split_scores_every_held_out_token_once():
  cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    ffn_dim=64, max_seq_len=64)
  model = llama.create(cfg, seed=0)
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 50, L + 1).astype(np.int32) for _ in range(7)]  # 2 batches, 1 short
  split = runs.final_scores(model, _config("split"), None, docs)
  want = np.concatenate([_own_nll(model, d) for d in docs])
  assert split["eval_tokens"] == 7 * L
  assert split["eval_loss"] == pytest.approx(want.mean(), rel=1e-5)
  sample = runs.final_scores(model, _config("batches"), None, docs)
  assert sample["eval_tokens"] == 4 * L  # the first batch only
  assert sample["eval_loss"] != pytest.approx(split["eval_loss"], rel=1e-6)


def _train(tmp_path, name, final_eval):
  c = train_config.get_config("scratch,runlocal,lr=0.003")
  c.data.source = str(tmp_path / "docs.jsonl")
  c.upcycle.method = "none"
  c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  c.loop.update(steps=3, seq_len=32, batch_size=2, log_every=1, eval_every=100, eval_batches=1,
                ckpt_every=3, final_eval=final_eval)
  workdir = str(tmp_path / name)
  runs.train(c, workdir)
  with open(os.path.join(workdir, "final.json")) as f:
    return workdir, json.load(f)


def test_a_sampled_run_rescored_equals_a_run_scored_on_the_split(tmp_path):
  docs = corpus.stdlib_documents("train")[:120]  # the first 6 are held out
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  sampled_dir, sampled = _train(tmp_path, "sampled", "batches")
  assert sampled["final_eval"] == "batches" and sampled["eval_tokens"] <= 2 * 32
  _, split = _train(tmp_path, "split", "split")
  assert split["eval_tokens"] > 4 * sampled["eval_tokens"]
  assert split["sample_eval_loss"] == pytest.approx(sampled["eval_loss"], abs=1e-6)
  assert study.rescore_if_stale(sampled_dir, "split")
  with open(os.path.join(sampled_dir, "final.json")) as f:
    rescored = json.load(f)
  assert rescored["final_eval"] == "split" and rescored["eval_tokens"] == split["eval_tokens"]
  assert rescored["eval_loss"] == pytest.approx(split["eval_loss"], abs=1e-6)
  assert rescored["sample_eval_loss"] == sampled["eval_loss"]
  assert rescored["loss"] == sampled["loss"]  # the rest of the record is kept
  assert not study.rescore_if_stale(sampled_dir, "split")


def test_the_page_says_what_the_held_out_loss_was_scored_on():
  from moe_jax import study_report  # pylint: disable=g-import-not-at-top
  split = [{"eval_tokens": 110818.0, "final_eval": "split"}] * 2
  assert "all 110,818 scored tokens" in study_report.scored_on(split)
  mixed = split + [{"eval_tokens": 128.0, "final_eval": "batches"}]
  assert "fixed sample" in study_report.scored_on(mixed)
