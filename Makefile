# Two commands for a fresh machine: `make demo` and `make test`. Each creates (or reuses) the
# local virtual environment .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# torch is a test extra (parity against the PyTorch references), never a runtime need.
# torch 2.13.0 is the CPU build this project's machines carry on disk (about 1 GB installed; a CUDA
# build is several GB and has filled a CI disk). torchvision 0.28.0 is its release pair, taken from PyPI
# for pytorch-fid's Inception code: its compiled ops are CUDA-linked and do not load beside the CPU
# build, which tests/conftest.py works around. Any torch >= 2.5 works.
TORCH_SPEC ?= torch==2.13.0 torchvision==0.28.0
# Two workers: the suite is compile-bound and the machines have 2 cores.
PYTEST_ARGS ?= -n 2

.PHONY: demo test test-heavy lint install install-test benchmark clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.py
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,parity]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## demo: teacher training, SCFlow distillation and the 1/2/4-step evaluation table
demo: $(VENV)/.installed
	$(PY) -m scflow_jax.main --config=configs/default.py --workdir=$(WORKDIR)

## test: the CPU test suite (parity tests included), all but the `heavy` runs
test: $(VENV)/.installed-test
	$(PY) -m pytest -m "not heavy" $(PYTEST_ARGS)

## test-heavy: the minutes-long end-to-end runs (two real processes, the SD 1.5 recipe)
test-heavy: $(VENV)/.installed-test
	$(PY) -m pytest -m heavy $(PYTEST_ARGS)

## lint: ruff's checks (pyproject.toml: pycodestyle with lines of at most 100, pyflakes) and its format
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmark: $(VENV)/.installed
	$(PY) benchmarks/default_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
