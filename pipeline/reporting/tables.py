"""The report's tables under plots/: recovery.csv / recovery.json (one row per target x metric) and
throughput.csv / throughput.json (one row per target), with fixed columns so `dvc plots show` reads
them even when empty."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.accuracy.gates import tightest
from pipeline.reporting.entries import TargetEntry

RECOVERY_COLUMNS = ("label", "model", "format", "gpu", "tp", "target", "metric", "direction", "baseline",
                    "quantized", "recovery", "recovery_lower", "recovery_upper", "n", "threshold", "form", "increase",
                    "increase_lower", "increase_upper", "max_increase", "verdict", "eval_path")
TARGET_COLUMNS = ("label", "model", "format", "gpu", "tp", "target", "gate", "nearest_gate", "weights_bytes",
                  "kv_capacity_tokens", "output_tok_s", "throughput_source", "predicted_tok_s",
                  "measured_over_predicted", "joules_per_token", "power_source", "usd_per_mtok", "eval_path")


def write_tables(entries: Sequence[TargetEntry], tables_dir: Path) -> tuple[Path, ...]:
    """recovery.csv / recovery.json (one row per target x metric), throughput.csv / throughput.json
    (one row per target)."""
    recoveries, targets = recovery_rows(entries), target_rows(entries)
    return (
        write_table_csv(tables_dir / "recovery.csv", recoveries, RECOVERY_COLUMNS),
        write_table_json(tables_dir / "recovery.json", recoveries),
        write_table_csv(tables_dir / "throughput.csv", targets, TARGET_COLUMNS),
        write_table_json(tables_dir / "throughput.json", targets),
    )


def recovery_rows(entries: Sequence[TargetEntry]) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        report = e.gate
        for r in report.rows if report else ():
            rows.append(
                {
                    "label": f"{e.model} {e.target} {r.metric}",
                    "model": e.model,
                    "format": e.format,
                    "gpu": e.gpu,
                    "tp": e.tp,
                    "target": e.target,
                    "metric": r.metric,
                    "direction": r.direction,
                    "baseline": r.baseline,
                    "quantized": r.quantized,
                    # DVC plots and CSV readers want numbers: an infinite recovery is reported as
                    # None here and as "∞" in report.md (the gate JSON keeps the string "inf").
                    "recovery": finite(r.recovery),
                    "recovery_lower": finite(r.recovery_lower),
                    "recovery_upper": finite(r.recovery_upper),
                    "n": r.n,
                    "threshold": r.threshold,  # recovery space; the increase form states it as max_increase
                    "form": r.form,
                    "increase": finite(r.increase),
                    "increase_lower": finite(r.increase_lower),
                    "increase_upper": finite(r.increase_upper),
                    "max_increase": r.max_increase,
                    "verdict": r.verdict,
                    "eval_path": e.eval_path,
                }
            )
    return rows


def target_rows(entries: Sequence[TargetEntry]) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        report = e.gate
        nearest = tightest(report.rows) if report else None
        rows.append(
            {
                "label": f"{e.model} {e.target}",
                "model": e.model,
                "format": e.format,
                "gpu": e.gpu,
                "tp": e.tp,
                "target": e.target,
                "gate": report.verdict if report else None,
                # the metric nearest its threshold, on its own terms (GateRow.stated), not a min over both forms
                "nearest_gate": nearest.stated if nearest else None,
                "weights_bytes": e.memory.weights_bytes,
                "kv_capacity_tokens": e.memory.kv_capacity_tokens,
                "output_tok_s": e.throughput.output_tok_s if e.throughput else None,
                "throughput_source": e.throughput.source if e.throughput else None,
                "predicted_tok_s": e.throughput.predicted_tok_s if e.throughput else None,
                "measured_over_predicted": e.throughput.measured_over_predicted if e.throughput else None,
                "joules_per_token": e.joules_per_token,
                "power_source": e.power_source,
                "usd_per_mtok": e.usd_per_mtok,
                "eval_path": e.eval_path,
            }
        )
    return rows


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def write_table_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    # Fixed columns: a header even without rows, so `dvc plots show` reads an empty table, not an error.
    fields = list(columns)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


def write_table_json(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
