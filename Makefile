# The README's commands. `make repro` and `make test` do all set-up themselves on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that pip finds on local disk here (never a multi-GB CUDA build).
# On a GPU node inside the TensorRT-LLM container: make setup TORCH_SPEC= VENV_FLAGS=--system-site-packages
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
PIP = $(VENV)/bin/python -m pip --disable-pip-version-check -q
STAMP = $(VENV)/.forge-installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test plan bench clean-outputs readme

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_SPEC),$(PIP) install "$(TORCH_SPEC)" 2>&1 | grep -v "is ignored: it is neither" || true)
	$(PIP) install -e ".[dev]" $(if $(TORCH_SPEC),"$(TORCH_SPEC)") 2>&1 | grep -v "is ignored: it is neither" || true
	$(VENV)/bin/python -c "import torch, modelopt, lm_eval, dvc, pipeline" 
	touch $(STAMP)

# A recipe added or removed since plan.yaml was generated would be silently left out of (or
# still run by) `dvc repro`: refuse to start with a stale plan (`make plan` regenerates it).
repro: setup
	forge plan --dvc --check
	dvc repro

# Copy the results table of the last `dvc repro` (reports/readme_results.md) into README.md's
# results block; scripts/check_repro.py fails when the two differ.
readme: setup
	$(VENV)/bin/python scripts/readme_results.py --write

test: setup
	$(VENV)/bin/python -m pytest -q

plan: setup
	forge plan --dvc

bench: setup
	$(VENV)/bin/python bench/calibrate_overhead.py
