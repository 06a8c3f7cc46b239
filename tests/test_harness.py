"""lm-evaluation-harness adapter against the harness's own `hf` model on the same tiny
weights (a random Llama with a BPE trained here), the bundled task, and --config.tasks."""
import json
import os

import numpy as np
import pydoc_data.topics
import pytest

import lm_eval.tasks  # the `eval` extra, which `make` installs
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import hf_models

from configs import evaluate as eval_config
from moe_jax import harness, harness_tasks, runs, tokenizer as tokenizer_lib

MAX_LENGTH = 128  # the tiny model's positions: long requests are left-truncated


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_hf"))
  docs = harness_tasks.pydoc_next_docs(pydoc_data.topics.topics)
  tok = tokenizer_lib.train_bpe([d["context"] + " " + " ".join(d["choices"]) for d in docs], 1024)
  model = hf_models.make_model("llama", vocab_size=tok.vocab_size, bos_token_id=None,
                               eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
  model.save_pretrained(path)
  tok.tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
               "eos_token": tokenizer_lib.END_OF_TEXT, "pad_token": tokenizer_lib.END_OF_TEXT},
              f)
  return path


@pytest.fixture(scope="module")
def lms(hf_dir):
  ours = harness.MoeJaxLM(checkpoint=hf_dir, batch_size=4, max_length=MAX_LENGTH)
  ref = HFLM(pretrained=hf_dir, batch_size=4, max_length=MAX_LENGTH, device="cpu",
             dtype="float32")
  return ours, ref


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_the_hf_model(lms):
  ours, ref = lms
  docs = harness_tasks.pydoc_next_docs(pydoc_data.topics.topics)[:6]
  pairs = [(d["context"], " " + c) for d in docs for c in d["choices"] if len(c) < 150]
  pairs += [("", "An empty context."), ("Ends in a space ", "word"),
            (" ".join(d["context"] for d in docs), " past the model's length")]
  got, want = ours.loglikelihood(_requests("loglikelihood", pairs)), \
      ref.loglikelihood(_requests("loglikelihood", pairs))
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0)
  assert [g[1] for g in got] == [w[1] for w in want]
  # 1, 2 and 1 windows (longer texts: the reference's float32 sums drift past 1e-4)
  texts = [docs[0]["context"], " ".join(d["context"] for d in docs[:4]), "x"]
  np.testing.assert_allclose(ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts])),
                             ref.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts])),
                             atol=1e-4, rtol=0)


def test_accuracies_equal_the_hf_model(lms):
  ours, ref = lms
  accs = [harness.evaluate_tasks(lm, ["pydoc_next"], limit=16)["results"]["pydoc_next"]
          for lm in (ours, ref)]
  for key in ("acc,none", "acc_norm,none"):
    assert accs[0][key] == accs[1][key], key


def test_generate_until_equals_the_hf_model(lms):
  ours, ref = lms
  args = [("The assignment statement", {"until": ["."], "max_gen_toks": 10}),
          ("Names refer to", {"until": ["\n", "is"], "max_gen_toks": 6}),
          ("A", {"max_gen_toks": 10})]
  assert ours.generate_until(_requests("generate_until", args)) == \
      ref.generate_until(_requests("generate_until", args))


def test_bundled_task_labels_the_true_next_sentence():
  path = harness_tasks.PYDOC_NEXT
  with open(path, encoding="utf-8") as f:
    docs = [json.loads(line) for line in f]
  assert len(docs) == 400
  text = " ".join(" ".join(t.split()) for t in pydoc_data.topics.topics.values())
  follows = 0
  for d in docs:
    assert len(d["choices"]) == len(set(d["choices"])) == 4 and 0 <= d["label"] < 4
    follows += f"{d['context']} {d['choices'][d['label']]}" in text
  assert follows >= 0.95 * len(docs)  # a newer Python may have edited a few paragraphs


def test_evaluate_runs_tasks_and_writes_lm_eval_json(hf_dir, tmp_path):
  config = eval_config.get_config("runlocal")
  config.update(checkpoint=hf_dir, seq_len=32, max_windows=2, tasks="pydoc_next", task_limit=8)
  result = runs.evaluate(config, str(tmp_path / "eval"))
  with open(tmp_path / "eval" / "lm_eval.json") as f:
    saved = json.load(f)
  assert saved["results"]["pydoc_next"]["acc,none"] == result["tasks"]["pydoc_next"]["acc,none"]
  assert saved["n-samples"]["pydoc_next"]["effective"] == 8


@pytest.mark.parametrize("tasks,msg", [
    ("no_such_task", "config.tasks: unknown task 'no_such_task'"),
    ("{bad}.yaml", "{bad}.yaml: not a harness task YAML"),
    ("{missing}.yaml", "{missing}.yaml: task file not found"),
])
def test_bad_tasks_are_one_line_and_write_nothing(tmp_path, monkeypatch, tasks, msg):
  real = lm_eval.tasks.TaskManager  # its index of the harness's 14,000 tasks takes 16 s
  monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                      lambda include_path, include_defaults=True: real(include_path=include_path,
                                                                       include_defaults=False))
  bad = tmp_path / "bad"
  (tmp_path / "bad.yaml").write_text("task: [unclosed\n  : :")
  tasks, msg = (s.format(bad=bad, missing=tmp_path / "missing") for s in (tasks, msg))
  config = eval_config.get_config("runlocal")
  config.tasks = tasks
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    runs.evaluate(config, str(tmp_path / "eval"))
  assert msg in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "eval").exists()


def test_model_args_as_the_command_line_passes_them(hf_dir):
  """`--model_args checkpoint=...,batch_size=N` next to the command line's own
  --batch_size (default 1): the model's argument wins."""
  lm = harness.MoeJaxLM.create_from_arg_string(f"checkpoint={hf_dir},batch_size=3",
                                               {"batch_size": 1, "max_batch_size": None,
                                                "device": "cpu"})
  assert lm.batch_size == 3 and lm.max_length == 128
