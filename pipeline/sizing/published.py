"""Published trtllm-bench rows against the throughput model (pipeline/sizing/perfmodel.py).

Rows are CSV: model, gpu, precision, tp, [ep, attention_dp,] isl, osl, output_tok_s_total, source. The
calibration rows (bench/data/trtllm_bench_calibration.csv, dense; trtllm_bench_moe_calibration.csv, MoE)
are the only data the constants are fitted to; the held-out rows (bench/data/trtllm_bench_heldout.csv)
are evaluated once and never fitted to. Each row is predicted at the runtime limits trtllm-bench
itself picks for it (perfmodel.trtllm_bench_limits, per rank under attention DP), since that is the
run NVIDIA measured.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import GpuSpec
from pipeline.sizing.iteration import Efficiency, Precision
from pipeline.sizing.parallel import Parallelism
from pipeline.sizing.perfmodel import Prediction, Workload, kv_capacity, predict, trtllm_bench_limits
from pipeline.sizing.shapes import ModelShape, count_params

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION_ROWS = ROOT / "bench/data/trtllm_bench_calibration.csv"
MOE_CALIBRATION_ROWS = ROOT / "bench/data/trtllm_bench_moe_calibration.csv"
HELDOUT_ROWS = ROOT / "bench/data/trtllm_bench_heldout.csv"
# HF config.json per published model name: the shipped recipes' copies, and bench/data/configs.
MODEL_CONFIGS = {
    "Llama-3.1-8B": ROOT / "recipes/llama-3-1-8b-instruct/config.json",
    "Llama-3.3-70B": ROOT / "recipes/llama-3-3-70b-instruct/config.json",
    "Llama-3.1-405B": ROOT / "bench/data/configs/llama-3.1-405b-instruct.json",
    "Qwen3-30B-A3B": ROOT / "recipes/qwen3-30b-a3b/config.json",
    "Qwen3-235B-A22B": ROOT / "tests/data/configs/qwen3-235b-a22b.json",
    "GPT-OSS-120B": ROOT / "recipes/gpt-oss-120b/config.json",
}
# A published run of a pre-quantized checkpoint serves it as its publisher ships it (Precision.as_published,
# from the config's quantization_config), whatever the table's precision label says: the release/1.2 page
# runs openai/gpt-oss-120b, MXFP4 experts beside BF16 attention; its "FP8"/"FP4" headers name the KV
# cache and the Blackwell activation path.
PRECISION_FORMAT = {"FP8": "fp8", "FP4": "nvfp4"}
GPU_KEYS = {"H100": "h100", "H200": "h200", "B200": "b200", "RTX6000PRO": "rtx-pro-6000"}
# trtllm-bench's default KV share (perf-overview.md: "the default setting of 0.90").
BENCH_KV_FRACTION = 0.9


@dataclass(frozen=True)
class Row:
    model: str
    gpu: str
    precision: str
    tp: int
    isl: int
    osl: int
    measured: float  # published total output tok/s over the TP group
    source: str
    ep: int = 1
    attention_dp: bool = False

    @property
    def parallelism(self) -> Parallelism:
        return Parallelism(self.tp, self.ep, self.attention_dp)


def load_rows(path: Path) -> list[Row]:
    with open(path, newline="") as handle:
        rows = [Row(r["model"], r["gpu"], r["precision"], int(r["tp"]), int(r["isl"]), int(r["osl"]),
                    float(r["output_tok_s_total"]), r["source"], int(r.get("ep") or 1),
                    (r.get("attention_dp") or "no") == "yes") for r in csv.DictReader(handle)]
    unknown = sorted({r.model for r in rows} - set(MODEL_CONFIGS)) + sorted({r.gpu for r in rows} - set(GPU_KEYS))
    if unknown:
        raise RecipeError(str(path), f"unknown model/GPU names {unknown}.", f"use {sorted(MODEL_CONFIGS)} / {sorted(GPU_KEYS)}.")
    return rows


def predict_row(row: Row, catalog: dict[str, GpuSpec], eff: Efficiency) -> Prediction:
    config = json.loads(MODEL_CONFIGS[row.model].read_text())
    fmt, kv = FORMATS[PRECISION_FORMAT[row.precision]], KV_CACHE_DTYPES["fp8"]  # published runs: FP8 KV cache
    gpu = catalog[GPU_KEYS[row.gpu]]
    precision = Precision.as_published(config, gpu) or Precision.uniform(fmt)
    work = Workload.published(row.isl, row.osl)
    shape = ModelShape.from_hf_config(config)
    # Under attention DP trtllm-bench sizes each rank: its own KV pool and its share of the requests.
    rank_work = Workload(row.isl, row.osl, -(-work.num_requests // row.parallelism.dp_ranks))
    tokens_at_default = kv_capacity(shape, count_params(shape), precision.dense, kv, gpu, row.parallelism, 8192,
                                    BENCH_KV_FRACTION, precision=precision)
    limits = trtllm_bench_limits(tokens_at_default, rank_work)
    return predict(config, precision.dense, kv, gpu, row.parallelism, work, fraction=BENCH_KV_FRACTION, eff=eff,
                   limits=limits, precision=precision)


def errors(rows: list[Row], catalog: dict[str, GpuSpec], eff: Efficiency) -> list[tuple[Row, Prediction, float]]:
    """(row, prediction, signed relative error predicted/measured - 1) per row."""
    out = []
    for row in rows:
        p = predict_row(row, catalog, eff)
        out.append((row, p, p.predicted_output_tok_s / row.measured - 1))
    return out


def summary(errs: list[float]) -> dict[str, float]:
    absolute = sorted(abs(e) for e in errs)
    p90 = absolute[min(len(absolute) - 1, round(0.9 * (len(absolute) - 1)))]
    return {"rows": len(errs), "median_abs_error": statistics.median(absolute), "p90_abs_error": p90,
            "worst_abs_error": absolute[-1]}
