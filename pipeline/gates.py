"""Accuracy gates: is a quantized model close enough to its unquantized baseline?

Pure arithmetic, no I/O. A gate compares one metric of the quantized model with the same metric
of the baseline as a *recovery* ratio, where 1.0 means "as good as the baseline":

- higher-is-better metrics (acc, exact_match, ...): recovery = quantized / baseline
- lower-is-better metrics (perplexity, word_perplexity, bits_per_byte, ...): recovery =
  baseline / quantized

The direction of every metric is declared by the eval suite (`eval/suites/*.yaml`), never
inferred from its name. The thresholds follow two public conventions: llm-compressor's lm-eval
regression tests gate every metric on recovery >= 0.95, and MLPerf Inference requires >= 99% (or
99.9%) of the FP16 reference on each accuracy metric; `GatePolicy` expresses both as a default
plus per-metric overrides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pipeline.errors import RecipeError

Direction = Literal["higher", "lower"]
Verdict = Literal["pass", "fail"]
DIRECTIONS: tuple[Direction, ...] = ("higher", "lower")

# A recovery this close to its threshold counts as meeting it: 0.57 / 0.60 is 0.9499999999999998
# in binary floating point, and a gate must not fail on float rounding of a decimal boundary.
_BOUNDARY_REL_TOL = 1e-9


@dataclass(frozen=True)
class GatePolicy:
    """Minimum recovery per metric: a default and overrides keyed by metric ("task/metric,filter")."""

    default_min_recovery: float
    overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in [("default_min_recovery", self.default_min_recovery), *self.overrides.items()]:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise RecipeError(
                    f"gate policy: {name}",
                    f"minimum recovery must be a positive finite number, got {value!r}.",
                    "use a fraction of the baseline such as 0.95 (llm-compressor) or 0.99 (MLPerf).",
                )

    def threshold(self, metric: str) -> float:
        return float(self.overrides.get(metric, self.default_min_recovery))


@dataclass(frozen=True)
class GateRow:
    """One metric's verdict. `recovery` is None when it cannot be computed (see `reason`)."""

    metric: str
    baseline: float | None
    quantized: float | None
    direction: Direction
    recovery: float | None
    threshold: float
    verdict: Verdict
    reason: str


@dataclass(frozen=True)
class GateReport:
    """All gated metrics; the verdict is "pass" only if every row passes."""

    verdict: Verdict
    rows: tuple[GateRow, ...]

    @property
    def failed(self) -> tuple[GateRow, ...]:
        return tuple(row for row in self.rows if row.verdict == "fail")

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "rows": [
                {
                    "metric": r.metric,
                    "baseline": r.baseline,
                    "quantized": r.quantized,
                    "direction": r.direction,
                    "recovery": _json_number(r.recovery),
                    "threshold": r.threshold,
                    "verdict": r.verdict,
                    "reason": r.reason,
                }
                for r in self.rows
            ],
        }

    def to_json(self) -> str:
        # allow_nan=False: the output must be strict JSON (DVC, jq); infinities are spelled "inf".
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping) -> GateReport:
        rows = tuple(
            GateRow(
                metric=r["metric"],
                baseline=r["baseline"],
                quantized=r["quantized"],
                direction=r["direction"],
                recovery=_from_json_number(r["recovery"]),
                threshold=r["threshold"],
                verdict=r["verdict"],
                reason=r["reason"],
            )
            for r in data["rows"]
        )
        return cls(verdict=data["verdict"], rows=rows)

    def to_markdown(self) -> str:
        lines = [
            "| metric | direction | baseline | quantized | recovery | threshold | verdict | reason |",
            "|---|---|---:|---:|---:|---:|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.metric} | {r.direction} | {format_value(r.baseline)} | {format_value(r.quantized)} | "
                f"{format_recovery(r.recovery)} | {r.threshold:.3f} | {r.verdict.upper()} | {r.reason} |"
            )
        return "\n".join(lines) + "\n"


def format_value(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def format_recovery(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.4f}"


def _json_number(value: float | None) -> float | str | None:
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _from_json_number(value: float | str | None) -> float | None:
    return float(value) if isinstance(value, str) else value


def recovery(baseline: float, quantized: float, direction: Direction) -> float:
    """Recovery of a non-negative metric; 1.0 = no loss. Zero denominators are decided explicitly.

    A zero denominator means the side in the denominator is at the metric's floor: for a
    higher-is-better metric a 0 baseline, for a lower-is-better one a perfect (0) quantized value.
    Both 0 is no change (1.0); otherwise the numerator is better than the floor (inf).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    numerator, denominator = (quantized, baseline) if direction == "higher" else (baseline, quantized)
    if denominator == 0:
        return 1.0 if numerator == 0 else math.inf
    return numerator / denominator


def _row(
    metric: str, baseline: float | None, quantized: float | None, direction: Direction, threshold: float
) -> GateRow:
    def fail(reason: str, value: float | None = None) -> GateRow:
        return GateRow(metric, baseline, quantized, direction, value, threshold, "fail", reason)

    if baseline is None or quantized is None:
        missing = [side for side, v in (("baseline", baseline), ("quantized", quantized)) if v is None]
        return fail(f"missing in {' and '.join(missing)} results")
    if not (math.isfinite(baseline) and math.isfinite(quantized)):
        return fail("value is not finite (NaN or inf)")
    if baseline < 0 or quantized < 0:
        # A ratio of signed values does not order models (-2 / -1 = 2 for a worse score).
        return fail("recovery is only defined for non-negative metrics")
    value = recovery(baseline, quantized, direction)
    if baseline == 0 and direction == "higher" or quantized == 0 and direction == "lower":
        note = (
            "zero denominator: both 0, no change"
            if value == 1.0
            else "zero denominator: quantized improves on the floor"
        )
    else:
        note = ""
    passed = value >= threshold or math.isclose(value, threshold, rel_tol=_BOUNDARY_REL_TOL)
    if passed:
        reason = note or f"recovery {format_recovery(value)} >= {threshold:g}"
        return GateRow(metric, baseline, quantized, direction, value, threshold, "pass", reason)
    return fail(f"recovery {format_recovery(value)} < {threshold:g}" + (f" ({note})" if note else ""), value)


def evaluate_gates(
    baseline: Mapping[str, float],
    quantized: Mapping[str, float],
    directions: Mapping[str, Direction],
    policy: GatePolicy,
    where: str = "accuracy gates",
) -> GateReport:
    """Gate every metric in `directions` (the suite's declared metrics), in their given order.

    Metrics present in the results but without a declared direction are not gated. `where` names
    the recipe section the policy came from, for error messages.
    """
    if not directions:
        raise RecipeError(where, "no metrics to gate: the eval suite declares none.", "add metrics to the suite.")
    bad = {m: d for m, d in directions.items() if d not in DIRECTIONS}
    if bad:
        raise RecipeError(where, f"unknown direction(s) {bad}; allowed: {', '.join(DIRECTIONS)}.")
    unknown = sorted(set(policy.overrides) - set(directions))
    if unknown:
        raise RecipeError(
            f"{where}.overrides",
            f"override(s) for metric(s) not produced by the eval suite: {', '.join(unknown)}.",
            f"use one of: {', '.join(directions)}.",
        )
    rows = tuple(
        _row(metric, _number(baseline.get(metric)), _number(quantized.get(metric)), direction, policy.threshold(metric))
        for metric, direction in directions.items()
    )
    verdict: Verdict = "pass" if all(r.verdict == "pass" for r in rows) else "fail"
    return GateReport(verdict=verdict, rows=rows)


def _number(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
