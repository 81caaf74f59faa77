"""NVML power while a benchmark runs, and what it costs: joules per token and USD per million tokens
from measured watts ("nvml") or the catalog TDP ("tdp"), always labelled. pynvml is imported inside
the sampler only, so this module imports on a CPU machine.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import ForgeError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- power


@dataclass(frozen=True)
class PowerReading:
    mean_watts: float | None  # summed over the sampled GPUs; None when NVML gave nothing
    samples: int
    duration_s: float
    devices: tuple[int, ...]
    note: str = ""


class PowerSampler:
    """Samples NVML board power of some GPUs in a background thread while a run is in progress.

        with PowerSampler(devices=(0, 1)) as sampler:
            run()
        reading = sampler.reading   # mean watts summed over both GPUs

    pynvml (distribution nvidia-ml-py) is imported on start; `nvml` replaces it in tests. Without
    NVML the reading has mean_watts None and a note, and callers fall back to TDP (labelled).
    """

    def __init__(self, devices: Sequence[int] = (0,), interval_s: float = 0.1, nvml: Any = None):
        self.devices = tuple(devices)
        self.interval_s = interval_s
        self._nvml = nvml
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: list[float] = []
        self._started = 0.0
        self._note = ""
        self.reading: PowerReading | None = None

    def start(self) -> PowerSampler:
        nvml = self._nvml
        if nvml is None:
            try:
                import pynvml as nvml  # lazy: absent or driverless on CPU hosts
            except ImportError:
                self._note = "pynvml (nvidia-ml-py) not installed"
                return self
        try:
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.devices]
        except nvml.NVMLError as exc:
            self._note = f"NVML unavailable: {exc}"
            return self
        self._nvml = nvml
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, args=(nvml, handles), name="forge-power", daemon=True)
        self._thread.start()
        return self

    def _loop(self, nvml: Any, handles: list[Any]) -> None:
        while True:
            try:
                # nvmlDeviceGetPowerUsage answers milliwatts for the whole board.
                self._samples.append(sum(nvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1e3)
            except nvml.NVMLError as exc:
                self._note = f"NVML power read failed: {exc}"
                return
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> PowerReading:
        duration = 0.0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            duration = time.monotonic() - self._started
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        samples = list(self._samples)
        self.reading = PowerReading(
            mean_watts=statistics.fmean(samples) if samples else None,
            samples=len(samples),
            duration_s=duration,
            devices=self.devices,
            note=self._note or ("" if samples else "no power samples"),
        )
        return self.reading

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def energy_and_cost(
    tok_s: float,
    watts: float | None,
    tdp_watts: float,
    tp: int,
    price_per_gpu_hour: float | None,
) -> dict[str, Any]:
    """Joules per output token, GPU-hours and USD per million output tokens.

    `tok_s` is the whole run's output tok/s; `watts` the mean power of all `tp` GPUs together
    (NVML); without it every GPU is assumed at `tdp_watts`, an upper bound, and labelled "tdp".
    """
    if tok_s <= 0:
        raise ForgeError("energy_and_cost", f"throughput must be > 0 tok/s, got {tok_s}.",
                         "use the output tok/s of a benchmark that completed.")
    if tp < 1:
        raise ForgeError("energy_and_cost", f"tp must be >= 1, got {tp}.", "pass the run's TP size.")
    source = "nvml" if watts is not None else "tdp"
    power = watts if watts is not None else tdp_watts * tp
    gpu_hours_per_mtok = tp * 1e6 / (tok_s * 3600)
    return {
        "power_source": source,
        "watts": power,
        "joules_per_token": power / tok_s,
        "gpu_hours_per_mtok": gpu_hours_per_mtok,
        "usd_per_mtok": None if price_per_gpu_hour is None else price_per_gpu_hour * gpu_hours_per_mtok,
        "price_per_gpu_hour_usd": price_per_gpu_hour,
        "tp": tp,
    }


def measured_vs_predicted(measured_tok_s: float, predicted_tok_s: float) -> float:
    """measured / predicted. The roofline is a ceiling: TensorRT-LLM's published runs land near
    0.3-0.4 of it (its perf-overview.md), so a ratio above 1 means the prediction, not the run, is wrong."""
    if not predicted_tok_s or predicted_tok_s <= 0:
        raise ForgeError("measured_vs_predicted", f"predicted throughput must be > 0, got {predicted_tok_s}.",
                         "plan a configuration that fits (forge plan) before comparing.")
    return measured_tok_s / predicted_tok_s
