"""The latency-aware mode (pipeline/sizing/online.py) against MLPerf Inference's own server/offline and
interactive/offline throughput ratios (bench/data/mlperf_calibration.csv: NVIDIA's closed-division
results for Llama-2-70B on 8xH100, v5.0, and Llama-3.1-8B on 8xB200, v5.1).

    python bench/mlperf_ratios.py            # prints one line per assumption, then the summary JSON

A ratio compares two runs of the same system, so it does not depend on how many replicas share the
eight GPUs. What the published results do not say is every input the model needs, so the script
sweeps each unknown and prints the range:
- lengths: only Llama-2-70B's mean output is published (294.45 tokens, OpenOrca reference run,
  mlcommons/inference language/llama2-70b); its inputs are capped below 1,024 tokens. Llama-3.1-8B's
  CNN/DailyMail outputs are capped at 128 tokens (max_new_tokens). Every other mean is swept;
- precision and TP of the submission: swept over what fits.
The latency limits are MLPerf's (loadgen/mlperf.conf, p99): Llama-2-70B Server 2000/200 ms;
Llama-3.1-8B Server 2000/100 ms and Interactive 500/30 ms (TTFT/TPOT).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import load_catalog
from pipeline.sizing.iteration import Efficiency, Hardware, step_model
from pipeline.sizing.memory import ServingShape, memory_at_tp
from pipeline.sizing.online import Slo, max_rate
from pipeline.sizing.parallel import Parallelism
from pipeline.sizing.shapes import ModelShape, count_params

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "bench/data/mlperf_calibration.csv"
CONFIGS = {"Llama-2-70B": ROOT / "bench/data/configs/llama-2-70b-chat.json",
           "Llama-3.1-8B": ROOT / "recipes/llama-3-1-8b-instruct/config.json"}
SLOS = {("Llama-2-70B", "Server"): Slo(2000, 200), ("Llama-3.1-8B", "Server"): Slo(2000, 100),
        ("Llama-3.1-8B", "Interactive"): Slo(500, 30)}
# The swept unknowns per model: (input mean, output mean) pairs, formats, TP sizes.
SWEEPS = {
    "Llama-2-70B": {"lengths": [(isl, 294) for isl in (200, 400, 800)], "formats": ["fp8"], "tp": [1, 2, 4]},
    "Llama-3.1-8B": {"lengths": [(isl, osl) for isl in (600, 800, 1000) for osl in (64, 100, 128)],
                     "formats": ["fp8", "nvfp4"], "tp": [1]},
}
MAX_NUM_TOKENS = 8192  # TensorRT-LLM's default (BaseLlmArgs.max_num_tokens)
GPUS = {"Llama-2-70B": "h100", "Llama-3.1-8B": "b200"}
# The one case per model that bench/fit_perfmodel.py fits the per-iteration overhead to: FP8 at TP 2
# for Llama-2-70B on H100 (TP 1 leaves 70 GB of FP8 weights almost no KV cache), NVFP4 for
# Llama-3.1-8B on B200 (a stated assumption: the results table names the system, not the precision),
# and mid-range lengths of the swept ones.
FIT_CASES = {"Llama-2-70B": ("fp8", 2, 400, 294), "Llama-3.1-8B": ("nvfp4", 1, 800, 100)}


def predicted_ratio(model: str, scenario: str, fmt_name: str, tp: int, isl: int, osl: int, eff: Efficiency,
                    catalog: dict) -> float | None:
    """Server (or Interactive) over Offline output tokens/s, predicted; None where the KV cache holds
    (almost) nothing at this TP. Where the limits never bind below the offline rate, the answer is
    the rate search's highest step, 2^(-10/512) = 0.987 of it (RateAnswer.binding says which)."""
    config = json.loads(CONFIGS[model].read_text())
    shape = ModelShape.from_hf_config(config)
    counts = count_params(shape)
    gpu, fmt, kv = catalog[GPUS[model]], FORMATS[fmt_name], KV_CACHE_DTYPES["fp8"]
    split = memory_at_tp(shape, counts, fmt, kv, gpu, ServingShape(max_input_len=isl, max_output_len=osl, seq_len=isl + osl,
                         max_num_tokens=MAX_NUM_TOKENS, kv_cache_free_gpu_memory_fraction=0.9), Parallelism(tp))
    capacity, batch = split.capacity, min(4096, split.max_batch_per_rank)
    if batch < 8:
        return None
    step = step_model(shape, counts, fmt, kv, Hardware.of(gpu, fmt), tp, eff, context=isl + osl / 2)
    answer = max_rate(step, [(isl, osl)], SLOS[(model, scenario)], batch, MAX_NUM_TOKENS, capacity)
    return answer.output_tok_s / answer.offline_output_tok_s


def published_ratios() -> dict[tuple[str, str], float]:
    with open(ROWS, newline="") as handle:
        rows = list(csv.DictReader(handle))
    offline = {(r["model"], r["gpu"]): float(r["output_tok_s_total"]) for r in rows if r["scenario"] == "Offline"}
    return {(r["model"], r["scenario"]): float(r["output_tok_s_total"]) / offline[(r["model"], r["gpu"])]
            for r in rows if r["scenario"] != "Offline"}


def main() -> int:
    catalog = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
    eff = Efficiency.load()
    summary: dict[str, dict] = {}
    seconds = []
    for (model, scenario), measured in published_ratios().items():
        predicted = []
        for fmt_name in SWEEPS[model]["formats"]:
            for tp in SWEEPS[model]["tp"]:
                for isl, osl in SWEEPS[model]["lengths"]:
                    start = time.perf_counter()
                    ratio = predicted_ratio(model, scenario, fmt_name, tp, isl, osl, eff, catalog)
                    if ratio is None:
                        continue
                    seconds.append(time.perf_counter() - start)
                    predicted.append(ratio)
                    fitted = " (the fitted case)" if FIT_CASES[model] == (fmt_name, tp, isl, osl) else ""
                    fitted += "" if ratio < 0.985 else "  [the limits never bind: the search's top step]"
                    print(f"{model:13s}{scenario:12s}{fmt_name:6s}TP{tp}  {isl:5d}/{osl:<4d} predicted {ratio:.3f}  "
                          f"published {measured:.3f}{fitted}", flush=True)
        fmt_name, tp, isl, osl = FIT_CASES[model]
        summary[f"{model} {scenario}/Offline"] = {
            "published": round(measured, 4),
            "predicted_fitted_case": round(predicted_ratio(model, scenario, fmt_name, tp, isl, osl, eff, catalog), 4),
            "predicted_min": round(min(predicted), 4), "predicted_max": round(max(predicted), 4), "cases": len(predicted)}
    print(json.dumps({"ratios": summary, "seconds_per_rate_search_median": round(sorted(seconds)[len(seconds) // 2], 4)},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
