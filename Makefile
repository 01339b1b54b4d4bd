# calokit Makefile -- `make all` runs the chain, `make test` proves it.
#
# Variables (override on the command line, e.g. `make all DATASET=1-photons ITERATIONS=20000`):
#   PYTHON      interpreter used to create the virtual environment        (python3)
#   VENV        virtual environment directory                              (.venv)
#   REQS        pinned requirements file (requirements-gpu.txt for GPUs)   (requirements.txt)
#   PYTEST_ARGS extra arguments for pytest, e.g. "-m slow" or "-k hlf"    ()
PYTHON ?= python3
VENV ?= .venv
REQS ?= requirements.txt
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(notdir $(REQS))

.PHONY: venv test bench clean-venv help

help:
	@sed -n '1,12p' Makefile

# The venv is (re)built only when the requirements file changes.
venv: $(STAMP)
$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(REQS)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b --quick; done

clean-venv:
	rm -rf $(VENV)
