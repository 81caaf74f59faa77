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
    """A recovery (1.0 = no loss) with its interval, and how its gate states it: `form` min_recovery
    (`limit` is the minimum recovery) or max_increase (`limit` is the maximum relative increase; the
    table and plot show the increase 1/recovery - 1, the gate's own terms)."""

    point: float | None
    lower: float | None = None
    upper: float | None = None
    form: str = "min_recovery"
    limit: float | None = None

    @classmethod
    def from_gate_row(cls, row: Mapping[str, Any]) -> MetricResult:
        interval = row.get("interval") if isinstance(row.get("interval"), (list, tuple)) else (None, None)
        lower = row.get("recovery_lower", interval[0])
        upper = row.get("recovery_upper", interval[1])
        form = row.get("form") or "min_recovery"
        limit = row.get("max_increase") if form == "max_increase" else row.get("threshold")
        return cls(_num(row.get("recovery")), _num(lower), _num(upper), form, _num(limit))

    @property
    def increase_form(self) -> bool:
        return self.form == "max_increase"

    def on_terms(self) -> tuple[float | None, float | None, float | None]:
        """(point, lower, upper) as the gate states them: recovery, or increase in percent."""
        if not self.increase_form:
            return self.point, self.lower, self.upper
        # the increase is 1/recovery - 1, so the recovery's upper bound is the increase's lower bound
        return _increase_pct(self.point), _increase_pct(self.upper), _increase_pct(self.lower)

    def cell(self) -> str:
        point, lower, upper = self.on_terms()
        if point is None:
            return "-"
        spec = "+.1f" if self.increase_form else ".4f"
        unit = "%" if self.increase_form else ""
        if lower is not None and upper is not None:
            bound = "+.1f" if self.increase_form else ".3f"
            return f"{point:{spec}}{unit} [{lower:{bound}}{unit}, {upper:{bound}}{unit}]"
        return f"{point:{spec}}{unit}"

    def limit_text(self, default: float | None = None) -> str | None:
        """The gate in its own terms, e.g. ">= 0.95" or "<= +36.6%"; `default` for a row without its own."""
        limit = self.limit if self.limit is not None else (None if self.increase_form else default)
        if limit is None:
            return None
        return f"<= {100 * limit:+.1f}%" if self.increase_form else f">= {limit:g}"


def _increase_pct(recovery: float | None) -> float | None:
    if recovery is None:
        return None
    return math.inf if recovery == 0 else 100 * (1 / recovery - 1)  # 0: an infinite increase, not a missing one


@dataclass(frozen=True)
class Variant:
    name: str                    # recipe variant, e.g. "nvfp4-auto-5"
    format: str
    effective_bits: float
    whole_checkpoint_bits: float | None
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
    gates = {m: _gate_of(variants, m, threshold) for m in metric_names}
    lines += ["", ("Effective bits: decoder Linear weights, scales counted (pipeline/quant/bits.py); whole checkpoint: "
                   "every stored byte over every parameter (embedding included). Each metric as its own gate states it "
                   "(recovery, or the relative increase for a max-increase gate), its gate in the column head."), ""]
    # No "quantize s": the report is a DVC output and holds no wall-clock number (the calibrate
    # stage's quantize_s is in its timings metrics, `dvc metrics show metrics/run`).
    header = ["variant", "how", "effective bits", "whole ckpt bits", "held-out ppl",
              *(f"{m} ({gates[m]})" if gates[m] else m for m in metric_names), "gate", "published"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in sorted(variants, key=lambda v: v.effective_bits):
        cells = [v.name + (" *" if v.name in front else ""), v.note or "-", f"{v.effective_bits:.3f}",
                 _fmt(v.whole_checkpoint_bits, ".3f"),
                 _fmt(v.perplexity_delta_pct, "+.1f", "%"),
                 *[(v.metrics.get(m) or MetricResult(None)).cell() for m in metric_names],
                 v.verdict or "-", v.published or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![effective bits vs recovery]({plot})"]
    return "\n".join(lines) + "\n"


def _gate_of(variants: Sequence[Variant], metric: str, default: float | None) -> str | None:
    """The metric's gate as the variants' gate rows state it (the first that has one)."""
    results = [v.metrics[metric] for v in variants if metric in v.metrics]
    return next((t for t in (r.limit_text(default) for r in results) if t), None)


def plot(variants: Sequence[Variant], metric_names: Sequence[str], threshold: float | None, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(variants, metric_names, threshold).savefig(path)
    return path


def figure(variants: Sequence[Variant], metric_names: Sequence[str], threshold: float | None):
    """Effective bits (x) vs each metric on its gate's own terms (y): recovery for min-recovery gates,
    relative increase (%) for max-increase gates, one panel each, intervals as error bars, and each
    metric's own gate as a dashed line in its colour (`threshold`: for metrics whose rows carry none).
    One line for every metric put a passing perplexity point below another metric's 0.95 (issue 26)."""
    from matplotlib.figure import Figure

    forms = [f for f in ("min_recovery", "max_increase")
             if any(v.metrics[m].form == f for v in variants for m in metric_names if m in v.metrics)]
    fig = Figure(figsize=(6 * max(1, len(forms)), 5), dpi=110, layout="constrained")
    axes = fig.subplots(1, max(1, len(forms)), squeeze=False)[0]
    ordered = sorted(variants, key=lambda v: v.effective_bits)
    for ax, form in zip(axes, forms or ["min_recovery"]):
        names = [m for m in metric_names if any(m in v.metrics and v.metrics[m].form == form for v in ordered)]
        for i, metric in enumerate(names):
            _plot_metric(ax, ordered, metric, f"C{i}", (i - len(names) / 2) * 0.01)
            gate = next(v.metrics[metric] for v in ordered if metric in v.metrics)
            limit = gate.limit if gate.limit is not None else (None if form == "max_increase" else threshold)
            if limit is not None:
                ax.axhline(100 * limit if form == "max_increase" else limit, color=f"C{i}", linestyle="--",
                           linewidth=1, label=f"{metric} gate {gate.limit_text(threshold)}")
        for v in ordered:
            points = [p for p in (v.metrics[m].on_terms()[0] for m in names if m in v.metrics) if p is not None]
            if points:
                ax.annotate(v.name, (v.effective_bits, min(points) if form == "min_recovery" else max(points)),
                            textcoords="offset points", xytext=(4, -12), fontsize=7)
        ax.set_xlabel("effective bits per weight (decoder Linears, scales counted)")
        ax.set_ylabel("recovery (quantized / baseline)" if form == "min_recovery" else "increase over baseline, %")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("effective bits vs each metric on its own gate's terms")
    return fig


def _plot_metric(ax, ordered: Sequence[Variant], metric: str, color: str, offset: float) -> None:
    xs, ys, lo, hi = [], [], [], []
    for v in ordered:
        m = v.metrics.get(metric)
        point, lower, upper = m.on_terms() if m else (None, None, None)
        if point is None:
            continue
        xs.append(v.effective_bits + offset)  # a small offset per metric
        ys.append(point)
        lo.append(point - lower if lower is not None else 0.0)
        hi.append(upper - point if upper is not None else 0.0)
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", linestyle="-", capsize=3, color=color, label=metric)


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
    return Variant(
        name=name, format=format_name, effective_bits=float(results.effective_bits),
        whole_checkpoint_bits=_num(results.whole_checkpoint_bits),
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
