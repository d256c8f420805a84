# Two commands for a fresh machine: `make demo` and `make test`. Each creates (or reuses) the
# local virtual environment .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# torch is a test extra (parity against the PyTorch references), never a runtime need.
# 2.13.0 is the CPU build this project's machines carry; any torch >= 2.5 works.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install install-test benchmark clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.py
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## demo: teacher training, SCFlow distillation and the 1/2/4-step evaluation table
demo: $(VENV)/.installed
	$(PY) -m scflow_jax.main --config=configs/default.py --workdir=$(WORKDIR)

## test: the whole CPU test suite (parity tests included)
test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

benchmark: $(VENV)/.installed
	$(PY) benchmarks/default_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
