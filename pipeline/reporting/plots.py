"""The report's figures: each model's targets against each metric's own gate (recovery or increase,
95% paired bootstrap intervals, not-pass bars hatched) and output tok/s per target (measured or
predicted, never the roofline ceiling), drawn on bare matplotlib Figures (Agg canvas; `dvc plots
show` embeds the PNGs, no network needed)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.accuracy.gates import GateRow, short_metric
from pipeline.reporting.entries import TargetEntry
from pipeline.reporting.tables import finite


def short_target(e: TargetEntry) -> str:
    """"fp8@h200" (TP shown only when > 1): a label short enough never to be cut."""
    return f"{e.variant or e.format}@{e.gpu}" + (f"x{e.tp}" if e.tp > 1 else "")


def recovery_figure_name(model: str) -> str:
    """The file name of a model's recovery plot under figures/."""
    return f"recovery_{slug(model)}.png"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "model"


def _figure(width: float, height: float):
    # A bare Figure renders with the Agg canvas on savefig and touches no pyplot global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_recovery(model: str, targets: Sequence[TargetEntry], path: Path) -> Path:
    recovery_figure(model, targets).savefig(path)
    return path


def recovery_figure(model: str, targets: Sequence[TargetEntry]):
    """One panel per gate form, each metric on its own terms: recovery against its minimum (acc, ...),
    relative increase against its maximum (perplexity-type metrics). Each metric's own threshold is a
    dashed segment over that metric's bars only: one rule across every metric put a passing
    perplexity point below another metric's 0.95 (issue 26)."""
    gated = [(t, {r.metric: r for r in t.gate.rows}) for t in targets if t.gate]
    forms: dict[str, list[str]] = {"min_recovery": [], "max_increase": []}
    for _, rows in gated:
        for r in rows.values():
            if r.metric not in forms[r.form]:
                forms[r.form].append(r.metric)
    panels = [(form, metrics) for form, metrics in forms.items() if metrics]
    widths = [max(2.5, 1.2 * len(m) * max(1, len(gated)) * 0.5 + 1.5) for _, m in panels] or [6.0]
    fig = _figure(max(7.0, sum(widths)), 4.5)
    axes = fig.subplots(1, max(1, len(panels)), width_ratios=widths if panels else None, squeeze=False)[0]
    width = 0.8 / max(1, len(gated))
    for ax, (form, metrics) in zip(axes, panels):
        for k, (t, rows) in enumerate(gated):
            xs, ys, colors, errs = [], [], [], [[], []]
            for i, m in enumerate(metrics):
                point = _on_terms(rows.get(m))
                if point is None:
                    continue
                xs.append(i + (k - (len(gated) - 1) / 2) * width)
                ys.append(point[0])
                colors.append(None if rows[m].verdict == "pass" else "black")
                errs[0].append(max(0.0, point[0] - point[1]))
                errs[1].append(max(0.0, point[2] - point[0]))
            bars = ax.bar(xs, ys, width=width, label=short_target(t), yerr=errs, capsize=2, ecolor="dimgray",
                          color=f"C{k}")
            for bar, edge in zip(bars, colors):
                if edge:
                    bar.set_edgecolor(edge)
                    bar.set_hatch("//")
        for i, m in enumerate(metrics):
            row = next(rows[m] for _, rows in gated if m in rows)
            limit = 100 * row.max_increase if form == "max_increase" else row.threshold
            ax.hlines(limit, i - 0.45, i + 0.45, colors="red", linestyles="--", linewidth=1.2,
                      label=f"{short_metric(m)} gate {row.threshold_text}")
        ax.set_xticks(range(len(metrics)), [short_metric(m) for m in metrics], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("recovery (1.0 = baseline)" if form == "min_recovery" else "increase over baseline, %")
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: each metric against its own gate (dashed)\n95% paired bootstrap intervals; "
                 "hatched: not pass", fontsize=10)
    return fig


def _on_terms(row: GateRow | None) -> tuple[float, float, float] | None:
    """(point, lower, upper) as the row's gate states it: recovery, or increase in percent."""
    if row is None:
        return None
    if row.form == "max_increase":
        values = [finite(v) for v in (row.increase, row.increase_lower, row.increase_upper)]
        scale = 100.0
    else:
        values = [finite(v) for v in (row.recovery, row.recovery_lower, row.recovery_upper)]
        scale = 1.0
    if values[0] is None:
        return None
    point = values[0] * scale
    return point, (values[1] * scale if values[1] is not None else point), (values[2] * scale if values[2] is not None else point)


def plot_throughput(entries: Sequence[TargetEntry], path: Path) -> Path | None:
    rows = [e for e in entries if e.throughput]
    if not rows:
        return None
    fig = _figure(max(6.0, 0.6 * len(rows) + 2), 4.5)
    ax = fig.subplots()
    several_models = len({e.model for e in rows}) > 1
    labels = [(f"{e.model}\n" if several_models else "") + short_target(e) for e in rows]
    values = [e.throughput.output_tok_s for e in rows]
    bars = ax.bar(
        range(len(rows)), values, color=["tab:blue" if e.throughput.source == "measured" else "tab:gray" for e in rows]
    )
    for bar, e in zip(bars, rows):
        if e.throughput.source == "predicted":
            bar.set_hatch("..")
    ax.set_xticks(range(len(rows)), labels, rotation=0 if len(rows) < 6 else 30, fontsize=8)
    ax.set_ylabel("output tok/s, trtllm-bench offline run")
    ax.set_title("Throughput per target" + ("" if several_models else f" ({rows[0].model})"), fontsize=10)
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


def plot_pareto(curves: Sequence[tuple[str, Sequence[dict[str, float]]]], title: str, path: Path) -> Path | None:
    """Output tok/s per GPU against tok/s per user (1000 / TPOT), one curve per configuration as its
    concurrency grows (pipeline/sizing/recommend.py pareto_points), all predicted."""
    drawn = [(label, points) for label, points in curves if points]
    if not drawn:
        return None
    fig = _figure(7.5, 5.0)
    ax = fig.subplots()
    for label, points in drawn:
        ax.plot([p["tok_s_per_user"] for p in points], [p["tok_s_per_gpu"] for p in points], marker="o",
                markersize=3, label=label)
    ax.set_xlabel("output tok/s per user (1000 / TPOT), predicted")
    ax.set_ylabel("output tok/s per GPU, predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path
