"""The report's figures: recovery per metric for each model's targets (95% paired bootstrap intervals,
not-pass bars hatched) and decode throughput per target (measured or predicted), drawn on bare
matplotlib Figures (Agg canvas; `dvc plots show` embeds the PNGs, no network needed)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.reporting.entries import TargetEntry
from pipeline.reporting.readme_results import short_metric
from pipeline.reporting.tables import finite


def short_target(e: TargetEntry) -> str:
    """"fp8@h200" (TP shown only when > 1): a label short enough never to be cut."""
    return f"{e.variant or e.format}@{e.gpu}" + (f"x{e.tp}" if e.tp > 1 else "")


def recovery_figure_name(model: str) -> str:
    """The file name of a model's recovery plot under figures/."""
    return f"recovery_{_slug(model)}.png"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "model"


def _figure(width: float, height: float):
    # A bare Figure renders with the Agg canvas on savefig and touches no pyplot global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_recovery(model: str, targets: Sequence[TargetEntry], path: Path) -> Path:
    gated = [(t, t.gate) for t in targets if t.gate]
    metrics: list[str] = []
    for _, report in gated:
        for r in report.rows:
            if r.metric not in metrics:
                metrics.append(r.metric)
    fig = _figure(max(6.0, 1.2 * len(metrics) * max(1, len(gated)) * 0.5 + 3), 4.5)
    ax = fig.subplots()
    width = 0.8 / max(1, len(gated))
    thresholds = set()
    for k, (t, report) in enumerate(gated):
        by_metric = {r.metric: r for r in report.rows}
        xs, ys, colors, errs = [], [], [], [[], []]
        for i, m in enumerate(metrics):
            r = by_metric.get(m)
            if r is None or r.recovery is None or not math.isfinite(r.recovery):
                continue
            xs.append(i + (k - (len(gated) - 1) / 2) * width)
            ys.append(r.recovery)
            colors.append(None if r.verdict == "pass" else "black")
            thresholds.add(r.threshold)
            low, high = finite(r.recovery_lower), finite(r.recovery_upper)
            errs[0].append(max(0.0, r.recovery - low) if low is not None else 0.0)
            errs[1].append(max(0.0, high - r.recovery) if high is not None else 0.0)
        bars = ax.bar(xs, ys, width=width, label=short_target(t), yerr=errs, capsize=2, ecolor="dimgray")
        for bar, edge in zip(bars, colors):
            if edge:
                bar.set_edgecolor(edge)
                bar.set_hatch("//")
    for th in sorted(thresholds):
        ax.axhline(th, color="red", linestyle="--", linewidth=1, label=f"threshold {th:g}")
    ax.set_xticks(range(len(metrics)), [short_metric(m) for m in metrics], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("recovery (1.0 = baseline)")
    ax.set_title(f"{model}: accuracy recovery, 95% paired bootstrap intervals (hatched: not pass)", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_throughput(entries: Sequence[TargetEntry], path: Path) -> Path | None:
    rows = [e for e in entries if e.throughput]
    if not rows:
        return None
    fig = _figure(max(6.0, 0.6 * len(rows) + 2), 4.5)
    ax = fig.subplots()
    several_models = len({e.model for e in rows}) > 1
    labels = [(f"{e.model}\n" if several_models else "") + short_target(e) for e in rows]
    values = [e.throughput.decode_tok_s_max_batch for e in rows]
    bars = ax.bar(
        range(len(rows)), values, color=["tab:blue" if e.throughput.source == "measured" else "tab:gray" for e in rows]
    )
    for bar, e in zip(bars, rows):
        if e.throughput.source == "predicted":
            bar.set_hatch("..")
    ax.set_xticks(range(len(rows)), labels, rotation=0 if len(rows) < 6 else 30, fontsize=8)
    ax.set_ylabel("decode tok/s at max batch")
    ax.set_title("Decode throughput per target" + ("" if several_models else f" ({rows[0].model})"), fontsize=10)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(facecolor="tab:blue", label="measured"),
            Patch(facecolor="tab:gray", hatch="..", label="predicted"),
        ],
        fontsize=8,
    )
    fig.savefig(path)
    return path
