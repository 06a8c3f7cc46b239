"""The embedded corpora: deterministic, disjoint train/valid splits per domain, and the
two domains interleaved (data.source=stdlib+pydoc); batched encoding equals encode."""
import ml_collections
from pydoc_data import topics

from moe_jax import runs
from moe_jax import tokenizer as tokenizer_lib
from moe_jax.data import corpus


def test_pydoc_topics_split_disjointly_and_cover_every_topic():
  train, valid = corpus.pydoc_documents("train"), corpus.pydoc_documents("valid")
  assert valid and train and not set(train) & set(valid)
  assert sorted(train + valid) == sorted(topics.topics.values())
  assert corpus.pydoc_documents("valid") == valid  # deterministic


def test_interleave_keeps_each_order_and_every_prefix_proportional():
  a, b = [f"a{i}" for i in range(7)], [f"b{i}" for i in range(3)]
  out = corpus.interleave(a, b)
  assert [d for d in out if d[0] == "a"] == a and [d for d in out if d[0] == "b"] == b
  for n in range(1, len(out) + 1):
    assert abs(sum(d[0] == "b" for d in out[:n]) - n * 3 / 10) <= 1
  assert corpus.interleave(a, []) == a and corpus.interleave([], b) == b


def test_stdlib_and_pydoc_source_holds_both_domains_with_their_held_out_splits():
  config = ml_collections.ConfigDict({"data": {"source": "stdlib+pydoc", "field": "text",
                                               "max_docs": 40}})
  train, valid = runs.data_texts(config)
  pydoc_train, pydoc_valid = corpus.pydoc_documents("train"), corpus.pydoc_documents("valid")
  assert len(train) == 40 and any(d in pydoc_train for d in train)
  assert any(d in corpus.stdlib_documents("train") for d in train)
  assert set(pydoc_valid) <= set(valid) and not set(valid) & set(train)


def test_each_domain_alone_keeps_the_split_of_the_mixture():
  """data.source=stdlib and =pydoc (domain branches) hold out exactly what stdlib+pydoc
  holds out of that domain, so a branch never trains on the mixture's held-out text."""
  config = lambda src: ml_collections.ConfigDict({"data": {"source": src, "field": "text",
                                                           "max_docs": 0}})
  both_train, both_valid = runs.data_texts(config("stdlib+pydoc"))
  for src in ("stdlib", "pydoc"):
    train, valid = runs.data_texts(config(src))
    assert set(valid) <= set(both_valid) and set(train) <= set(both_train)
    assert runs.domain_eval_texts(config(src)) == runs.domain_eval_texts(config("stdlib+pydoc"))
  assert runs.domain_eval_texts(config("stdlib+pydoc"))["english"] == corpus.pydoc_documents("valid")
  assert runs.domain_eval_texts(config("x.jsonl")) == {}


def test_encode_batch_equals_encode():
  tok = tokenizer_lib.train_bpe(corpus.pydoc_documents("valid"), 400)
  texts = corpus.pydoc_documents("valid")[:4] + ["", "x = 1\n"]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
