#!/usr/bin/env bash
# Measure the effective-bits / recovery frontier of the embedded default's NVFP4-family recipes
# through the DVC pipeline (the numbers the report's frontier section shows), then render the report
# from whatever stage outputs exist. Heavy: run it alone on the machine, e.g.
#   flock /tmp/forge-heavy.lock bash bench/quant_frontier.sh
# Prints each recipe's calibrate + evaluate time; the report lands in reports/report.md
# ("effective bits vs recovery") and reports/figures/frontier_smollm2-135m-instruct.png.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
model=smollm2-135m-instruct
for variant in nvfp4 nvfp4-auto-5 nvfp4-auto-6; do
  start=$(date +%s)
  dvc repro "publish@${model}-${variant}-b200"
  echo "${variant}: $(( $(date +%s) - start )) s (calibrate + evaluate + build + serve-eval + publish)"
done
forge report --plan plan.yaml --data data --out reports
git checkout dvc.lock 2>/dev/null || true
