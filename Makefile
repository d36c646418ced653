# Quickstart: `make demo` and `make test` both work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# Known-slow releases kept out (constraints.txt says which and why).
INSTALL := $(PIP) install -c constraints.txt
# The CPU build of torch; an unpinned torch pulls several GB of CUDA packages.
TORCH  := torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(INSTALL) -e .
	touch $@

$(VENV)/.dev: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(INSTALL) $(TORCH)
	$(INSTALL) -e '.[dev]'
	touch $@ $(VENV)/.core

venv: $(VENV)/.core

demo: $(VENV)/.dev
	$(VENV)/bin/bnfold demo --out demo-out

test: $(VENV)/.dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
