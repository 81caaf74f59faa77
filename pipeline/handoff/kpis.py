"""The DVC metrics files: a handful of numbers per target, for `dvc metrics show` / `dvc exp show`.

One table, KPIS: each stage's metrics file holds exactly the KPIs listed for it, under their
human names, numbers only (a verdict is 1/0), so `dvc metrics diff` and `dvc exp show` compare
them. Adding a KPI is one line here, naming a key of the results the stage already computes.
Everything else a stage knows goes into its output (manifest `details`, gate_report.json,
throughput.json) and the report. Nothing reads a metrics file back: DVC metrics are a one-way
view for people (the report stage reads the stages' outputs).

Two kinds, kept apart because DVC hashes one and not the other:
- KPIs (`--metrics metrics/<stage>/<key>.json`): stage outputs (`metrics:` with `cache: false`, their
  digests in dvc.lock, tracked by git). Results only, so the same inputs give the same bytes.
- timings (`--timings metrics/run/<stage>/<key>.json`, `write_timings`): what this run cost, seconds
  per phase and peak memory; different on every run, so no stage declares them (dvc.yaml lists the
  folder under its top-level `metrics:`, which DVC reads but never hashes) and git ignores them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.files import write_metrics


@dataclass(frozen=True)
class Kpi:
    name: str  # the key in the metrics file, as `dvc metrics show` prints it
    source: str  # the key in the stage's results
    unit: str  # what the number means, for the docs and the report
    decides: bool = False  # one of the few `make compare` shows for two commits (DECIDING_COLUMNS)


KPIS: dict[str, tuple[Kpi, ...]] = {
    "calibrate": (
        Kpi("perplexity_change_pct", "perplexity_delta_pct", "held-out perplexity, quantized vs BF16, %"),
        Kpi("checkpoint_bytes", "checkpoint_bytes", "bytes of the exported checkpoint"),
        Kpi("effective_bits", "effective_bits", "bits per decoder Linear weight, scales counted (pipeline/quant/bits.py)",
            decides=True),
    ),
    "evaluate": (
        Kpi("gate_pass", "gate_passed", "1 when every accuracy gate passed, 0 when publish refuses it", decides=True),
        Kpi("min_recovery", "min_recovery", "lowest recovery over the gated metrics (1.0 = no loss)", decides=True),
        Kpi("min_recovery_lower", "min_recovery_lower",
            "lowest lower bound of the gated metrics' 95% recovery intervals (paired bootstrap)"),
        Kpi("gates_failed", "gates_failed", "how many gated metrics are below their threshold"),
        Kpi("served", "served", "serve-eval only: 1 when a real engine scored it, 0 when none here runs it"),
    ),
    "build": (
        Kpi("weights_bytes_per_gpu", "predicted_weights_bytes_per_gpu", "predicted weight memory per GPU"),
        Kpi("kv_capacity_tokens", "predicted_kv_capacity_tokens", "predicted KV-cache capacity, tokens"),
    ),
    "throughput": (
        Kpi("predicted_tok_s", "predicted_output_tok_s", "predicted trtllm-bench output tok/s (pipeline/sizing/perfmodel.py)",
            decides=True),
        Kpi("usd_per_mtok", "predicted_usd_per_mtok", "$ per million output tokens of the predicted run at the "
            "target's price per GPU-hour (absent without a price)", decides=True),
        Kpi("ceiling_tok_s", "ceiling_decode_tok_s_max_batch", "decode roofline ceiling at the max batch (upper bound)"),
        Kpi("measured_tok_s", "measured_output_tok_s", "trtllm-bench output tok/s (on the target GPU only)"),
    ),
}


def deciding_columns() -> str:
    """The regex `make compare` keeps (`dvc exp show --drop '.*' --keep ...`): the row labels and the
    deciding KPIs of every metrics file (metrics/<stage>/<key>.json:<kpi>, DVC's column names), so two
    commits compare in a dozen columns per pair of targets, not one per recipe field."""
    names = sorted({k.name for kpis in KPIS.values() for k in kpis if k.decides})
    return rf"^(Experiment|rev|Created)$|^metrics/[a-z-]+/[^/:]+\.json:({'|'.join(names)})$"


def select(stage: str, results: Mapping[str, Any]) -> dict[str, float | int]:
    """The stage's KPIs out of its results. A KPI whose value is absent or None (e.g. measured
    throughput off the target GPU) is left out, never written as a placeholder."""
    values: dict[str, float | int] = {}
    for kpi in KPIS[stage]:
        value = results.get(kpi.source)
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"KPI {stage}.{kpi.name} ({kpi.source}) must be a finite number, got {value!r}")
        values[kpi.name] = value if isinstance(value, int) else round(float(value), 6)
    return values


def write_kpis(path: Path, stage: str, results: Mapping[str, Any]) -> dict[str, float | int]:
    """Write the stage's metrics file (atomic, strict JSON); returns what was written."""
    values = select(stage, results)
    write_metrics(Path(path), values)
    return values


TIMINGS_HELP = ("write this run's wall-clock seconds per phase (and peak memory) here, as a DVC metrics "
                "file; never into the output, which is byte-identical for identical inputs")


def write_timings(path: Path | None, seconds: Mapping[str, float], **measured: float | None) -> dict[str, float | int]:
    """This run's cost as a DVC metrics file at `path` (nothing when None): `<phase>_s` per timed
    phase (pipeline/core/files.py Timer), `total_s`, and any other measurement of the run itself
    (peak memory). Never part of a stage's output: see the module docstring."""
    values: dict[str, float | int] = {f"{phase}_s": round(float(s), 3) for phase, s in seconds.items()}
    values["total_s"] = round(float(sum(seconds.values())), 3)
    values.update({k: v if isinstance(v, int) else round(float(v), 3) for k, v in measured.items() if v is not None})
    if path is not None:
        write_metrics(Path(path), values)
    return values
