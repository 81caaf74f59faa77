"""Measured throughput: running trtllm-bench under an NVML power sampler and summarising what was
measured against what the planner predicted. The parts live beside it: pipeline/measure/probe.py (GPU
ceilings, `forge probe`), pipeline/measure/bench_io.py (dataset, commands, report), pipeline/measure/power.py
(power, energy and cost).

Three sources of numbers, always labelled:
  predicted   the planner's roofline (pipeline/sizing/roofline.py) from datasheet or probe ceilings;
  measured    a torch probe of this GPU (copy bandwidth, dense GEMM rates), or a trtllm-bench report;
  power       NVML samples taken while a benchmark ran ("nvml"), else the catalog TDP ("tdp").
Nothing here invents a number: without trtllm-bench and a CUDA GPU, `run_bench` returns `NotRun`.

torch, pynvml and subprocesses are touched only inside the functions that need them, so this module
imports on a CPU machine without side effects.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.core.errors import ForgeError
from pipeline.measure.bench_io import (
    BenchCommand,
    BenchReport,
    parse_bench_report,
)
from pipeline.measure.power import PowerReading, PowerSampler, energy_and_cost, measured_vs_predicted

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class NotRun:
    """A measurement that did not happen, and why. Never carries numbers."""

    reason: str


@dataclass(frozen=True)
class BenchRun:
    mode: str
    argv: tuple[str, ...]
    report: BenchReport
    power: PowerReading
    wall_s: float


def cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def run_bench(
    command: BenchCommand,
    which: Callable[[str], str | None] = shutil.which,
    cuda_available: Callable[[], bool] = cuda_visible,
    power_interval_s: float = 0.5,
    timeout_s: float | None = None,
    nvml: Any = None,
) -> BenchRun | NotRun:
    """Run one trtllm-bench command with NVML power sampling over its GPUs; NotRun when the
    executable or a CUDA GPU is missing. A failed run raises ForgeError with the output's tail."""
    executable = which(command.argv[0])
    if executable is None:
        return NotRun(f"{command.argv[0]} not found on PATH (TensorRT-LLM is not installed here)")
    if not cuda_available():
        return NotRun("no CUDA GPU visible")
    command.report_json.parent.mkdir(parents=True, exist_ok=True)
    log.info("running %s", " ".join(command.argv))
    started = time.monotonic()
    with PowerSampler(devices=tuple(range(command.tp)), interval_s=power_interval_s, nvml=nvml) as sampler:
        proc = subprocess.run([executable, *command.argv[1:]], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        raise ForgeError(
            f"trtllm-bench {command.mode}",
            f"exited with status {proc.returncode}: " + " | ".join(tail),
            "run the printed command by hand to see the full log; check the bundle and its options file.",
        )
    return BenchRun(command.mode, command.argv, parse_bench_report(command.report_json), sampler.reading, wall)


def measured_summary(
    run: BenchRun,
    predicted_tok_s: float | None,
    tdp_watts: float,
    price_per_gpu_hour: float | None,
) -> dict[str, Any]:
    """One labelled record per run: measured numbers, the prediction they are compared with, the
    ratio, and energy/cost. Compare throughput runs with the planner's max-batch decode rate and
    latency runs (batch 1) with its batch-1 rate."""
    report = run.report
    out: dict[str, Any] = {
        "mode": run.mode,
        "measured": report.to_json(),
        "predicted_tok_s": predicted_tok_s,
        "measured_over_predicted": None
        if not predicted_tok_s
        else measured_vs_predicted(report.output_tok_s, predicted_tok_s),
        "power": asdict(run.power),
        "energy": energy_and_cost(report.output_tok_s, run.power.mean_watts, tdp_watts, report.world_size,
                                  price_per_gpu_hour),
        "argv": list(run.argv),
        "wall_s": run.wall_s,
    }
    return out
