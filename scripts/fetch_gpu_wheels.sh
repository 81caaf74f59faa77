#!/usr/bin/env bash
# Download, here, the wheels scripts/gpu_check.sh installs on the GPU machine, into .whl/ (ignored by
# git; a device call names it in `carry`). That machine has Python 3.12, torch 2.11+cu130,
# transformers 5.17, accelerate 1.15, safetensors, numpy, scipy, rich, pyyaml, ninja, regex, tqdm,
# nvidia-ml-py (the lent GPU machine's own listing) and no package registry: carry only what it lacks. The
# pins are the versions this repo's .venv runs, so the GPU check exercises the same ModelOpt.
# Flags: pip's own for cp312 manylinux x86_64 wheels (--platform, --python-version, --only-binary=:all:).
# Usage: scripts/fetch_gpu_wheels.sh   (or: make gpu-wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
LIMIT_BYTES=$((60 * 1024 * 1024))  # the device call carries at most 64 MiB in all, repo included
WHEELS=(
  nvidia-modelopt==0.47.0          # the pinned ModelOpt (pyproject.toml)
  omegaconf==2.3.1                 # ModelOpt requirement missing there
  pydantic==2.14.4                 # forge's schemas, and ModelOpt's configs
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  pulp==3.3.2                      # ModelOpt requirement (imported by its NAS/search code)
)
PY=${PYTHON:-python3}
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
# omegaconf pins antlr4-python3-runtime 4.9.*, published as an sdist only: build its pure-Python
# wheel (py3-none-any, so it installs on the cp312 machine too).
"$PY" -m pip wheel --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -la "$DEST"
echo "wheels: $(ls "$DEST"/*.whl | wc -l) files, $total bytes (limit $LIMIT_BYTES with the repo)"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "error: $DEST is $total bytes, over $LIMIT_BYTES: drop a wheel or the device call will refuse it" >&2
  exit 1
fi
