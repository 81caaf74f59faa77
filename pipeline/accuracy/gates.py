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

Every recovery comes with a paired bootstrap interval (pipeline/accuracy/stats.py) over the suite's
documents, and the verdict reads the interval, not the point:
- PASS when the interval's lower bound clears the threshold, FAIL when its upper bound is below
  it, INCONCLUSIVE when the interval straddles it (the suite cannot tell); the recipe says whether
  an inconclusive gate publishes (`eval.gates.inconclusive`).
- Lower-is-better metrics (perplexity, bits per byte) are stated as a *maximum relative increase*
  of quantized over baseline (0.10 = at most 10% worse), with its interval; it is the same test as
  a minimum recovery of 1 / (1 + increase), so the default 0.95 means +5.26% at most.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import ConfigDict

from pipeline.accuracy.stats import Interval
from pipeline.core.errors import RecipeError
from pipeline.core.json_numbers import from_json_number, json_number
from pipeline.recipe.eval_schema import INCONCLUSIVE_POLICIES, Inconclusive

Direction = Literal["higher", "lower"]
Verdict = Literal["pass", "fail", "inconclusive"]
Form = Literal["min_recovery", "max_increase"]
DIRECTIONS: tuple[Direction, ...] = ("higher", "lower")
POINT_ONLY = "point estimate (no per-document results)"

# A recovery this close to its threshold counts as meeting it: 0.57 / 0.60 is 0.9499999999999998
# in binary floating point, and a gate must not fail on float rounding of a decimal boundary.
_BOUNDARY_REL_TOL = 1e-9


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds per metric: a default minimum recovery and overrides keyed by metric
    ("task/metric,filter"); for lower-is-better metrics optionally a maximum relative increase
    (a default and per-metric values), which takes precedence over the recovery form."""

    default_min_recovery: float
    overrides: Mapping[str, float] = field(default_factory=dict)
    default_max_increase: float | None = None
    max_increase: Mapping[str, float] = field(default_factory=dict)
    inconclusive: Inconclusive = "refuse"

    def __post_init__(self) -> None:
        for name, value in [("default_min_recovery", self.default_min_recovery), *self.overrides.items()]:
            if not _positive(value):
                raise RecipeError(
                    f"gate policy: {name}",
                    f"minimum recovery must be a positive finite number, got {value!r}.",
                    "use a fraction of the baseline such as 0.95 (llm-compressor) or 0.99 (MLPerf).",
                )
        increases = [("default_max_increase", self.default_max_increase)] if self.default_max_increase is not None else []
        for name, value in [*increases, *self.max_increase.items()]:
            if not _positive(value):
                raise RecipeError(
                    f"gate policy: {name}",
                    f"maximum relative increase must be a positive finite number, got {value!r}.",
                    "use a fraction such as 0.05 (at most 5% above the baseline).",
                )
        if self.inconclusive not in INCONCLUSIVE_POLICIES:
            raise RecipeError("gate policy: inconclusive", f"must be one of {', '.join(INCONCLUSIVE_POLICIES)}, "
                              f"got {self.inconclusive!r}.", "use refuse (the default) or publish.")

    def threshold(self, metric: str) -> float:
        """The minimum recovery of a higher-is-better metric (the recovery form)."""
        return float(self.overrides.get(metric, self.default_min_recovery))

    def gate_for(self, metric: str, direction: Direction) -> tuple[Form, float, float]:
        """(form, the threshold in that form, the equivalent minimum recovery)."""
        if direction == "higher":
            value = self.threshold(metric)
            return "min_recovery", value, value
        if metric in self.max_increase:
            limit = float(self.max_increase[metric])
        elif metric not in self.overrides and self.default_max_increase is not None:
            limit = float(self.default_max_increase)
        else:  # the recovery form, kept exact: recovery >= t is increase <= 1/t - 1
            minimum = self.threshold(metric)
            return "max_increase", 1 / minimum - 1, minimum
        return "max_increase", limit, 1 / (1 + limit)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class GateRow:
    """One metric's verdict. `recovery` is None when it cannot be computed (see `reason`).

    Recovery space (uniform over directions, 1.0 = no loss): `recovery` with its interval
    `recovery_lower`..`recovery_upper` and `threshold` (the minimum recovery). `form` says how the
    recipe states the threshold; for "max_increase" rows `increase` (quantized / baseline - 1),
    its interval and `max_increase` say the same in that form. `n` documents were paired.

    The report reads gate_report.json rows back through pydantic as this class (pipeline/reporting/
    entries.py): unknown keys are refused, and "inf"/"-inf" (to_dict's spelling) parse as floats."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    metric: str
    baseline: float | None
    quantized: float | None
    direction: Direction
    recovery: float | None
    threshold: float
    verdict: Verdict
    reason: str
    recovery_lower: float | None = None
    recovery_upper: float | None = None
    form: Form = "min_recovery"
    max_increase: float | None = None
    increase: float | None = None
    increase_lower: float | None = None
    increase_upper: float | None = None
    n: int = 0
    method: str = POINT_ONLY
    confidence: float | None = None
    # False: shown with its verdict, but the suite gates on other rows (eval/suites/*.yaml `gate: false`)
    decides: bool = True

    def to_dict(self) -> dict:
        return {k: (json_number(v) if isinstance(v, float) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> GateRow:
        names = cls.__dataclass_fields__
        return cls(**{k: (from_json_number(v) if k not in ("metric", "direction", "verdict", "reason", "form", "method",
                                                           "decides")
                          else v) for k, v in data.items() if k in names})

    @property
    def interval_text(self) -> str:
        """e.g. "0.9735 [0.9612, 0.9851]" or, for the increase form, "+3.1% [+2.0%, +4.3%]"."""
        if self.form == "max_increase" and self.increase is not None:
            if self.method == POINT_ONLY:
                return _pct(self.increase)
            return f"{_pct(self.increase)} [{_pct(self.increase_lower)}, {_pct(self.increase_upper)}]"
        if self.recovery_lower is None or self.method == POINT_ONLY:
            return format_recovery(self.recovery)
        return f"{format_recovery(self.recovery)} [{format_recovery(self.recovery_lower)}, {format_recovery(self.recovery_upper)}]"

    @property
    def threshold_text(self) -> str:
        if self.form == "max_increase" and self.max_increase is not None:
            return f"<= {_pct(self.max_increase)}"
        return f">= {self.threshold:g}"

    @property
    def stated(self) -> str:
        """On its gate's own terms, e.g. "forge_prose word_perplexity +5.7% [+4.6%, +7.0%] (<= +36.6%)":
        a perplexity-type metric as an increase against its allowed increase, never as a "recovery"
        beside another metric's minimum (issue 26: "min recovery 0.946" was shown next to a pass)."""
        return f"{short_metric(self.metric)} {self.interval_text} ({self.threshold_text})"

    @property
    def margin(self) -> float | None:
        """How far the interval's worse end clears the threshold, as a ratio in recovery space (< 1:
        short of it); the same scale for both forms, so rows of different metrics compare."""
        worst = self.recovery_lower if self.recovery_lower is not None else self.recovery
        return None if worst is None or not math.isfinite(worst) else worst / self.threshold


@dataclass(frozen=True)
class GateReport:
    """All gated metrics: "fail" if any row fails, else "inconclusive" if any row is, else "pass".
    `inconclusive_publishes` is the recipe's choice for an inconclusive verdict."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    verdict: Verdict
    rows: tuple[GateRow, ...]
    inconclusive_publishes: bool = False

    @property
    def failed(self) -> tuple[GateRow, ...]:
        return tuple(row for row in self.rows if row.verdict == "fail" and row.decides)

    @property
    def inconclusive(self) -> tuple[GateRow, ...]:
        return tuple(row for row in self.rows if row.verdict == "inconclusive" and row.decides)

    @property
    def publishes(self) -> bool:
        return self.verdict == "pass" or (self.verdict == "inconclusive" and self.inconclusive_publishes)

    @property
    def blocking(self) -> tuple[GateRow, ...]:
        """The rows that keep it from publishing (none when it publishes)."""
        return () if self.publishes else self.failed + self.inconclusive

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "inconclusive_publishes": self.inconclusive_publishes,
                "rows": [r.to_dict() for r in self.rows]}

    def to_json(self) -> str:
        # allow_nan=False: the output must be strict JSON (DVC, jq); infinities are spelled "inf".
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping) -> GateReport:
        return cls(verdict=data["verdict"], rows=tuple(GateRow.from_dict(r) for r in data["rows"]),
                   inconclusive_publishes=bool(data.get("inconclusive_publishes", False)))

    def to_markdown(self) -> str:
        lines = [
            "| metric | direction | baseline | quantized | recovery [95% CI] | threshold | n | verdict | reason |",
            "|---|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.metric} | {r.direction} | {format_value(r.baseline)} | {format_value(r.quantized)} | "
                f"{r.interval_text} | {r.threshold_text} | {r.n} | {r.verdict.upper()}{'' if r.decides else ' (reported)'} | "
                f"{r.reason} |"
            )
        return "\n".join(lines) + "\n"


def short_metric(key: str) -> str:
    """"forge_mc/acc,none" -> "forge_mc acc": lm-eval's default filter name says nothing."""
    task, _, metric = key.partition("/")
    metric = metric.removesuffix(",none")
    return f"{task} {metric}" if metric else task


def tightest(rows: Sequence[GateRow]) -> GateRow | None:
    """The row nearest its own threshold (smallest `margin`), to show one metric for a target."""
    scored = [r for r in rows if r.margin is not None and r.decides]
    return min(scored, key=lambda r: r.margin, default=None)  # type: ignore[arg-type,return-value]


def stated_point(metric: str, recovery: float, threshold: float, max_increase: float | None = None) -> str:
    """`GateRow.stated` from a point recovery alone (published metadata has no interval): "forge_mc acc
    0.9861 (>= 0.95)", or with a maximum increase "forge_prose word_perplexity +5.7% (<= +36.6%)"."""
    if max_increase is not None:
        return f"{short_metric(metric)} {_pct(_increase(recovery))} (<= {_pct(max_increase)})"
    return f"{short_metric(metric)} {format_recovery(recovery)} (>= {threshold:g})"


def format_value(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def format_recovery(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.4f}"


def _pct(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "+∞" if value > 0 else "-∞"
    return f"{value * 100:+.1f}%"


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


def _row(metric: str, baseline: float | None, quantized: float | None, direction: Direction,
         policy: GatePolicy, interval: Interval | None) -> GateRow:
    form, limit, threshold = policy.gate_for(metric, direction)
    base = {"metric": metric, "baseline": baseline, "quantized": quantized, "direction": direction,
            "threshold": threshold, "form": form, "max_increase": limit if form == "max_increase" else None}

    def fail(reason: str) -> GateRow:
        return GateRow(recovery=None, verdict="fail", reason=reason, **base)

    if baseline is None or quantized is None:
        missing = [side for side, v in (("baseline", baseline), ("quantized", quantized)) if v is None]
        return fail(f"missing in {' and '.join(missing)} results")
    if not (math.isfinite(baseline) and math.isfinite(quantized)):
        return fail("value is not finite (NaN or inf)")
    if baseline < 0 or quantized < 0:
        # A ratio of signed values does not order models (-2 / -1 = 2 for a worse score).
        return fail("recovery is only defined for non-negative metrics")
    value = recovery(baseline, quantized, direction)
    # The interval is of quantized / baseline; in recovery space a lower-is-better metric inverts it.
    ratio = interval if interval is not None else Interval(_inverse(value, direction), *[_inverse(value, direction)] * 2, 0,
                                                           method=POINT_ONLY)
    if direction == "higher":
        lower, upper = ratio.lower, ratio.upper
    else:
        lower, upper = _reciprocal(ratio.upper), _reciprocal(ratio.lower)
    extra = {"recovery_lower": lower, "recovery_upper": upper, "n": ratio.n, "method": ratio.method,
             "confidence": None if ratio.method == POINT_ONLY else ratio.confidence}
    if form == "max_increase":
        extra.update(increase=_increase(value), increase_lower=ratio.lower - 1, increase_upper=ratio.upper - 1)
    zero = baseline == 0 and direction == "higher" or quantized == 0 and direction == "lower"
    note = ("zero denominator: both 0, no change" if value == 1.0 else "zero denominator: quantized improves on the floor") \
        if zero else ""
    verdict = _verdict(lower, upper, threshold)
    row = GateRow(recovery=value, verdict=verdict, reason="", **base, **extra)
    reason = _reason(row) + (f" ({note})" if note else "")
    return replace(row, reason=reason)


def _verdict(lower: float, upper: float, threshold: float) -> Verdict:
    if lower >= threshold or math.isclose(lower, threshold, rel_tol=_BOUNDARY_REL_TOL):
        return "pass"
    if upper < threshold and not math.isclose(upper, threshold, rel_tol=_BOUNDARY_REL_TOL):
        return "fail"
    return "inconclusive"


def _reason(row: GateRow) -> str:
    point = row.method == POINT_ONLY
    if row.form == "max_increase":
        what = f"increase {_pct(row.increase)}" if point else f"increase {row.interval_text}"
        bound = {"pass": "upper bound <=", "fail": "lower bound >", "inconclusive": "interval straddles"}[row.verdict]
        if point:
            bound = {"pass": "<=", "fail": ">", "inconclusive": "at"}[row.verdict]
        return f"{what} {bound} {_pct(row.max_increase)}"
    what = f"recovery {row.interval_text}"
    bound = {"pass": "lower bound >=", "fail": "upper bound <", "inconclusive": "interval straddles"}[row.verdict]
    if point:
        bound = {"pass": ">=", "fail": "<", "inconclusive": "at"}[row.verdict]
    return f"{what} {bound} {row.threshold:g}"


def _inverse(recovery_value: float, direction: Direction) -> float:
    """quantized / baseline from a recovery (which is baseline / quantized for lower-is-better)."""
    return recovery_value if direction == "higher" else _reciprocal(recovery_value)


def _reciprocal(value: float) -> float:
    return math.inf if value == 0 else (0.0 if math.isinf(value) else 1 / value)


def _increase(recovery_value: float) -> float:
    return _reciprocal(recovery_value) - 1


def evaluate_gates(
    baseline: Mapping[str, float],
    quantized: Mapping[str, float],
    directions: Mapping[str, Direction],
    policy: GatePolicy,
    where: str = "accuracy gates",
    intervals: Mapping[str, Interval] | None = None,
    reported: frozenset[str] = frozenset(),
) -> GateReport:
    """Gate every metric in `directions` (the suite's declared metrics), in their given order; those in
    `reported` get a row and a verdict that does not decide the report's.

    `intervals` holds the paired bootstrap interval of quantized / baseline per metric
    (pipeline/accuracy/stats.py); a metric without one is judged on its point estimate and says so
    (`method`). Metrics present in the results but without a declared direction are not gated.
    `where` names the recipe section the policy came from, for error messages.
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
    lower = [m for m, d in directions.items() if d == "lower"]
    not_lower = sorted(set(policy.max_increase) - set(lower))
    if not_lower:
        raise RecipeError(
            f"{where}.max_increase",
            f"a maximum increase is for lower-is-better metrics; not one of the suite's: {', '.join(not_lower)}.",
            f"use one of: {', '.join(lower) or '(the suite has none)'}; gate higher-is-better metrics with overrides.",
        )
    both = sorted(set(policy.max_increase) & set(policy.overrides))
    if both:
        raise RecipeError(f"{where}.max_increase", f"{', '.join(both)} also has an override (min recovery).",
                          "state each metric's threshold once: keep max_increase or the override.")
    intervals = intervals or {}
    rows = tuple(
        replace(_row(metric, _number(baseline.get(metric)), _number(quantized.get(metric)), direction, policy,
                     intervals.get(metric)), decides=metric not in reported)
        for metric, direction in directions.items()
    )
    verdicts = {r.verdict for r in rows if r.decides}
    verdict: Verdict = "fail" if "fail" in verdicts else ("inconclusive" if "inconclusive" in verdicts else "pass")
    return GateReport(verdict=verdict, rows=rows, inconclusive_publishes=policy.inconclusive == "publish")


def _number(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
