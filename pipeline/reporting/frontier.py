"""The effective-bits / recovery frontier: every variant the pipeline tried, the Pareto set, and the
cheapest variant that passes its gates. Markdown table + PNG plot for the report stage.

Input is deliberately small so the gate work can feed intervals in without touching this module:
`MetricResult(point, lower=None, upper=None)` per metric (recovery, quantized / baseline), built
from a gate report row by `MetricResult.from_gate_row` (reads `recovery`, and an interval from
`recovery_lower`/`recovery_upper` or `interval: [lo, hi]` when the row has one). A variant passes
when its gate verdict says so (the gate decides, this module only reports it).

Cheapness is `effective_bits` (pipeline/quant/bits.py: decoder Linears, scales counted). A variant
is on the Pareto front when no other variant has fewer or equal bits and a higher-or-equal worst
recovery (strictly better in one of the two).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.handoff.models import CalibrateDetails


@dataclass(frozen=True)
class MetricResult:
    point: float | None
    lower: float | None = None
    upper: float | None = None

    @classmethod
    def from_gate_row(cls, row: Mapping[str, Any]) -> MetricResult:
        interval = row.get("interval") if isinstance(row.get("interval"), (list, tuple)) else (None, None)
        lower = row.get("recovery_lower", interval[0])
        upper = row.get("recovery_upper", interval[1])
        return cls(_num(row.get("recovery")), _num(lower), _num(upper))

    def cell(self) -> str:
        if self.point is None:
            return "-"
        if self.lower is not None and self.upper is not None:
            return f"{self.point:.4f} [{self.lower:.3f}, {self.upper:.3f}]"
        return f"{self.point:.4f}"


@dataclass(frozen=True)
class Variant:
    name: str                    # recipe variant, e.g. "nvfp4-auto-5"
    format: str
    effective_bits: float
    whole_checkpoint_bits: float | None
    quantize_seconds: float | None  # calibration (+ auto_quantize search)
    perplexity_delta_pct: float | None
    metrics: dict[str, MetricResult] = field(default_factory=dict)
    verdict: str | None = None   # the gate's verdict: pass, fail or inconclusive; None when not evaluated
    published: str | None = None  # version, or None
    note: str = ""               # algorithm / overrides / auto, for the table

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def worst_recovery(self) -> float | None:
        points = [m.point for m in self.metrics.values() if m.point is not None]
        return min(points) if points else None


def pareto(variants: Sequence[Variant]) -> list[Variant]:
    """Variants no other one dominates on (fewer bits, higher worst recovery), cheapest first."""
    scored = [v for v in variants if v.worst_recovery is not None]

    def dominated(v: Variant) -> bool:
        return any(o is not v and o.effective_bits <= v.effective_bits and o.worst_recovery >= v.worst_recovery
                   and (o.effective_bits < v.effective_bits or o.worst_recovery > v.worst_recovery) for o in scored)

    return sorted((v for v in scored if not dominated(v)), key=lambda v: v.effective_bits)


def cheapest_passing(variants: Sequence[Variant], max_bits: float | None = None) -> Variant | None:
    passing = [v for v in variants if v.passed and (max_bits is None or v.effective_bits <= max_bits)]
    return min(passing, key=lambda v: v.effective_bits, default=None)


def markdown(variants: Sequence[Variant], metric_names: Sequence[str], threshold: float | None,
             bits_goal: float | None, plot: str | None) -> str:
    front = {v.name for v in pareto(variants)}
    best = cheapest_passing(variants, bits_goal)
    lines = ["## Effective bits vs recovery (frontier)", ""]
    if best is not None:
        goal = f" at <= {bits_goal:g} effective bits" if bits_goal else ""
        lines.append(f"Cheapest variant that passes its gates{goal}: **{best.name}** "
                     f"({best.effective_bits:.3f} bits).")
    else:
        goal = f" at <= {bits_goal:g} effective bits" if bits_goal else ""
        passing = [v for v in variants if v.passed]
        lines.append(f"No variant passes its gates{goal}"
                     + (f"; the cheapest that passes at any size is {min(passing, key=lambda v: v.effective_bits).name}."
                        if passing else "; the Pareto variants (marked *) are the best trade-offs measured."))
    lines += ["", "Effective bits: decoder Linear weights, scales counted (pipeline/quant/bits.py); whole checkpoint: "
              "every stored byte over every parameter (embedding included)."
              + (f" Gate threshold {threshold:g}." if threshold else ""), ""]
    header = ["variant", "how", "effective bits", "whole ckpt bits", "quantize s", "held-out ppl", *metric_names,
              "gate", "published"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in sorted(variants, key=lambda v: v.effective_bits):
        cells = [v.name + (" *" if v.name in front else ""), v.note or "-", f"{v.effective_bits:.3f}",
                 _fmt(v.whole_checkpoint_bits, ".3f"), _fmt(v.quantize_seconds, ".1f"),
                 _fmt(v.perplexity_delta_pct, "+.1f", "%"),
                 *[(v.metrics.get(m) or MetricResult(None)).cell() for m in metric_names],
                 v.verdict or "-", v.published or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![effective bits vs recovery]({plot})"]
    return "\n".join(lines) + "\n"


def plot(variants: Sequence[Variant], metric_names: Sequence[str], threshold: float | None, path: Path) -> Path:
    """Effective bits (x) vs recovery per metric (y), intervals as error bars where given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ordered = sorted(variants, key=lambda v: v.effective_bits)
    for i, metric in enumerate(metric_names):
        xs, ys, lo, hi = [], [], [], []
        for v in ordered:
            m = v.metrics.get(metric)
            if m is None or m.point is None:
                continue
            xs.append(v.effective_bits + (i - len(metric_names) / 2) * 0.01)  # a small offset per metric
            ys.append(m.point)
            lo.append(m.point - m.lower if m.lower is not None else 0.0)
            hi.append(m.upper - m.point if m.upper is not None else 0.0)
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", linestyle="-", capsize=3, label=metric)
    for v in ordered:
        if v.worst_recovery is not None:
            ax.annotate(v.name, (v.effective_bits, v.worst_recovery), textcoords="offset points", xytext=(4, -12),
                        fontsize=7)
    if threshold:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"gate {threshold:g}")
    ax.set_xlabel("effective bits per weight (decoder Linears, scales counted)")
    ax.set_ylabel("recovery (quantized / baseline)")
    ax.set_title("effective bits vs recovery")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def variant_from_outputs(name: str, format_name: str, calibrate_details: CalibrateDetails,
                         gate: Mapping[str, Any] | None, published: str | None) -> Variant | None:
    """A Variant from the calibrate stage's typed handoff (pipeline/handoff/models.py) and the evaluate
    gate report."""
    results = calibrate_details.results
    if results is None or results.effective_bits is None:
        return None  # calibrated before effective bits were recorded
    rows = (gate or {}).get("rows") or []
    auto, overrides, algorithm = calibrate_details.auto, calibrate_details.overrides, calibrate_details.algorithm
    note = ", ".join(filter(None, [
        f"algorithm {algorithm}" if algorithm else "max",
        f"auto {auto['target_bits']:g} bits" if auto else None,
        f"{len(overrides)} override(s)" if overrides else None,
        " / ".join(f"{k} {n}" for k, n in (calibrate_details.layer_formats or {}).items()) or None,
    ]))
    seconds = results.quantize_seconds if results.quantize_seconds is not None else results.calibrate_seconds
    return Variant(
        name=name, format=format_name, effective_bits=float(results.effective_bits),
        whole_checkpoint_bits=_num(results.whole_checkpoint_bits),
        quantize_seconds=_num(seconds),
        perplexity_delta_pct=_num(results.perplexity_delta_pct),
        metrics={r["metric"]: MetricResult.from_gate_row(r) for r in rows},
        verdict=None if gate is None else gate.get("verdict"),
        published=published, note=note)


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"
