"""Fit the throughput model's efficiency constants to the published calibration rows ONLY.

    python bench/fit_perfmodel.py            # writes pipeline/sizing/perfmodel_constants.json

Data: bench/data/trtllm_bench_calibration.csv (22 trtllm-bench rows from TensorRT-LLM's
perf-overview, v1.0; bench/data/README.md gives the source). The held-out rows are never read here.
Method: deterministic coordinate descent on log(constant), minimising the sum of squared log
errors (relative error, symmetric in over- and under-prediction), from a fixed physical start,
with step halving; no randomness, so the same data gives the same constants.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.gpus import load_catalog
from pipeline.sizing.perfmodel import CONSTANTS_FILE, Efficiency
from pipeline.sizing.published import CALIBRATION_ROWS, ROOT, errors, load_rows, summary

START = Efficiency(gemm=0.6, gemm_fp4=0.6, hbm=0.8, attention=0.4, step_overhead_s=2e-3, seq_overhead_s=2e-6)
# Physical bounds: shares of a peak stay in (0, 1]; overheads are non-negative times.
BOUNDS = {"gemm": (0.05, 1.0), "gemm_fp4": (0.05, 1.0), "hbm": (0.3, 1.0), "attention": (0.05, 1.0),
          "step_overhead_s": (1e-5, 0.05), "seq_overhead_s": (1e-8, 1e-4)}
ROUNDS = 12


def loss(eff: Efficiency, rows, catalog) -> float:
    return sum(math.log1p(e) ** 2 for _, _, e in errors(rows, catalog, eff))


def fit(rows, catalog) -> tuple[Efficiency, float]:
    eff, best = START, loss(START, rows, catalog)
    step = 0.5  # multiplicative step in log space
    for _ in range(ROUNDS):
        improved = False
        for name, (lo, hi) in BOUNDS.items():
            for direction in (1, -1):
                trial = replace(eff, **{name: min(hi, max(lo, getattr(eff, name) * math.exp(direction * step)))})
                value = loss(trial, rows, catalog)
                if value < best - 1e-9:
                    eff, best, improved = trial, value, True
                    break
        if not improved:
            step /= 2
    return eff, best


def main() -> int:
    catalog = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
    rows = load_rows(CALIBRATION_ROWS)
    eff, value = fit(rows, catalog)
    stats = summary([e for _, _, e in errors(rows, catalog, eff)])
    payload = {
        "about": "Fitted by bench/fit_perfmodel.py to bench/data/trtllm_bench_calibration.csv only; "
                 "read by pipeline/sizing/perfmodel.py. Regenerate, do not edit.",
        "constants": asdict(eff),
        "fit": {"rows": len(rows), "loss_sum_sq_log_error": round(value, 6),
                **{k: round(v, 4) for k, v in stats.items() if k != "rows"}},
    }
    CONSTANTS_FILE.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
