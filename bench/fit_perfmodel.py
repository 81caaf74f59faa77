"""Fit the throughput model's efficiency constants to the published calibration rows ONLY.

    python bench/fit_perfmodel.py            # writes pipeline/sizing/perfmodel_constants.json
    python bench/fit_perfmodel.py --leave-one-out   # refits without each row in turn; prints its error

Data: bench/data/trtllm_bench_calibration.csv (22 dense trtllm-bench rows from TensorRT-LLM's
perf-overview, v1.0) and bench/data/trtllm_bench_moe_calibration.csv (6 MoE rows of the release/1.2
page), and MLPerf Inference's server/offline and interactive/offline ratios
(bench/data/mlperf_calibration.csv through bench/mlperf_ratios.py); bench/data/README.md gives the
sources. The held-out rows are never read here.
Method: bounded least squares on log(constant), minimising the sum of squared log errors (relative
error, symmetric in over- and under-prediction), from a fixed physical start; the per-iteration
overhead on a log grid against the rows and the MLPerf ratios together, alternating twice. No
randomness: the same data gives the same constants.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from scipy.optimize import least_squares

from bench.mlperf_ratios import FIT_CASES, predicted_ratio, published_ratios
from pipeline.core.gpus import load_catalog
from pipeline.sizing.iteration import CONSTANTS_FILE, Efficiency
from pipeline.sizing.published import CALIBRATION_ROWS, MOE_CALIBRATION_ROWS, ROOT, errors, load_rows, summary

START = Efficiency(gemm=0.6, gemm_fp4=0.6, hbm=0.8, attention=0.4, step_overhead_s=2e-3, seq_overhead_s=2e-6,
                   roofline_p=4.0, moe_gemm=0.5, moe_layer_overhead_s=2e-5)
# Physical bounds: shares of a peak stay in (0, 1]; overheads are non-negative times; p from the sum
# of the two limits (1) to practically their max (16).
BOUNDS = {"gemm": (0.05, 1.0), "gemm_fp4": (0.05, 1.0), "hbm": (0.3, 1.0), "attention": (0.05, 1.0),
          "step_overhead_s": (1e-5, 0.05), "seq_overhead_s": (1e-8, 1e-4), "roofline_p": (1.0, 16.0),
          "moe_gemm": (0.05, 1.0), "moe_layer_overhead_s": (1e-7, 1e-3)}


def residuals(eff: Efficiency, rows, catalog) -> np.ndarray:
    return np.array([math.log1p(e) for _, _, e in errors(rows, catalog, eff)])


def fit(rows, catalog, start: Efficiency = START, max_nfev: int = 400,
        fixed: tuple[str, ...] = ()) -> tuple[Efficiency, float]:
    """Least squares on log(constant) within BOUNDS (scipy's trust-region reflective solver, finite
    differences of 1e-3 in log space: a prediction moves in small steps where the simulated run
    changes its iteration count)."""
    names = [n for n in BOUNDS if n not in fixed]

    def at(x: np.ndarray) -> Efficiency:
        return replace(start, **{n: float(math.exp(v)) for n, v in zip(names, x)})

    lo = np.log([BOUNDS[n][0] for n in names])
    hi = np.log([BOUNDS[n][1] for n in names])
    x0 = np.clip(np.log([getattr(start, n) for n in names]), lo + 1e-9, hi - 1e-9)
    result = least_squares(lambda x: residuals(at(x), rows, catalog), x0, bounds=(lo, hi), diff_step=1e-3,
                           x_scale=1.0, max_nfev=max_nfev)
    eff = at(result.x)
    return eff, float(np.sum(residuals(eff, rows, catalog) ** 2))


def mlperf_residuals(eff: Efficiency, catalog) -> np.ndarray:
    """log(predicted / published) of MLPerf's server/offline and interactive/offline ratios, each at
    its fitted case (bench/mlperf_ratios.py FIT_CASES)."""
    out = []
    for (model, scenario), measured in published_ratios().items():
        fmt, tp, isl, osl = FIT_CASES[model]
        ratio = predicted_ratio(model, scenario, fmt, tp, isl, osl, eff, catalog)
        out.append(math.log(max(ratio, 0.01) / measured))  # 0: no rate meets the limits at all
    return np.array(out)


def fit_step_overhead(eff: Efficiency, rows, catalog) -> Efficiency:
    """The per-iteration overhead, on a log grid: it decides how long a decoding user waits per token
    when iterations are short (MLPerf interactive), and barely moves offline throughput, so it is
    chosen on the MLPerf ratios plus the trtllm-bench rows together. The ratios come out of a
    bisection, a step function of the constants that least squares cannot differentiate."""
    grid = [1e-5 * 10 ** (k / 8) for k in range(33)]  # 10 us .. 100 ms
    def total(value: float) -> float:
        trial = replace(eff, step_overhead_s=value)
        return float(np.sum(residuals(trial, rows, catalog) ** 2) + np.sum(mlperf_residuals(trial, catalog) ** 2))
    return replace(eff, step_overhead_s=min(grid, key=total))


def leave_one_out(rows, catalog, full: Efficiency) -> list[tuple[str, float]]:
    """Each row predicted by constants refitted without it, starting from the full fit (60 evaluations
    each, a few Jacobians: the optimum moves little when one of 28 rows leaves)."""
    out = []
    for i, row in enumerate(rows):
        eff, _ = fit(rows[:i] + rows[i + 1:], catalog, start=full, max_nfev=60, fixed=("step_overhead_s",))
        (_, _, err), = errors([row], catalog, eff)
        label = f"{row.model} {row.gpu} {row.precision} {row.parallelism} {row.isl}/{row.osl}"
        print(f"{label:60s}{err:+8.1%}", flush=True)
        out.append((label, err))
    return out


def stats_of(errs: list[float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in summary(errs).items() if k != "rows"}


def main() -> int:
    catalog = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
    dense, moe = load_rows(CALIBRATION_ROWS), load_rows(MOE_CALIBRATION_ROWS)
    rows = dense + moe
    if "--leave-one-out" in sys.argv:
        loo = leave_one_out(rows, catalog, Efficiency.load())
        print(json.dumps({"leave_one_out": {"dense": stats_of([e for _, e in loo[:len(dense)]]),
                                            "moe": stats_of([e for _, e in loo[len(dense):]])}}, indent=2))
        return 0
    eff, _ = fit(rows, catalog)
    for _ in range(2):  # alternate: the overhead on its grid, the rest by least squares with it held
        eff = fit_step_overhead(eff, rows, catalog)
        eff, _ = fit(rows, catalog, start=eff, fixed=("step_overhead_s",))
    value = float(np.sum(residuals(eff, rows, catalog) ** 2))
    mlperf = mlperf_residuals(eff, catalog)
    result = [e for _, _, e in errors(rows, catalog, eff)]
    payload = {
        "about": "Fitted by bench/fit_perfmodel.py to bench/data/trtllm_bench_calibration.csv and "
                 "trtllm_bench_moe_calibration.csv only; read by pipeline/sizing/perfmodel.py. Regenerate, do not edit.",
        "constants": asdict(eff),
        "fit": {"rows": len(rows), "loss_sum_sq_log_error": round(value, 6), **stats_of(result),
                "dense": {"rows": len(dense), **stats_of(result[:len(dense)])},
                "moe": {"rows": len(moe), **stats_of(result[len(dense):])},
                "mlperf_ratio_log_errors": [round(float(v), 4) for v in mlperf]},
    }
    CONSTANTS_FILE.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
