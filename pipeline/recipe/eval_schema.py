"""A recipe's `eval` section: the suite, the accuracy gates' thresholds and what an inconclusive gate does.

The recipe owns this vocabulary; pipeline/accuracy/gates.py applies it (and imports the policy names
from here).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.core.closed import Closed
from pipeline.recipe.fields import plain_name

# What an inconclusive gate (its interval straddles the threshold) does: refuse to publish, or publish.
Inconclusive = Literal["refuse", "publish"]
INCONCLUSIVE_POLICIES: tuple[Inconclusive, ...] = ("refuse", "publish")

# The one rule for which verdict publishes, stated in these words wherever it is stated: this field's
# documentation, the publish receipt (pipeline/stages/publish.py), report.md's publish section and the
# README (tests/unit/test_publish_stage.py checks each). pipeline/accuracy/gate_source.py applies it.
# The served verdict is not overridden by the simulation even where the served run scored fewer
# documents (dvc.yaml serve-eval --limit): a recipe that wants an underpowered, inconclusive served
# gate to publish says so with `inconclusive: publish`.
GATE_RULE = ("publish gates on one verdict: the served evaluation's where a real engine served the bundle, else "
             "the simulated evaluation's. PASS publishes, FAIL refuses, INCONCLUSIVE does what "
             "eval.gates.inconclusive says (refuse, the default: not published; publish: published). The other "
             "evaluation is recorded beside it and never replaces it.")


def _recovery(value: float, field: str) -> float:
    # Recovery is quantized / baseline (llm-compressor's lm-eval tests; pipeline/accuracy/gates.py), so a
    # minimum above 1 asks the quantized model to beat the baseline and one <= 0 gates nothing.
    if not 0 < value <= 1:
        hint = f"; for {value:g}% write {value / 100:g}" if 1 < value <= 100 else ""
        raise ValueError(f"{field} is a recovery ratio (quantized / baseline) in (0, 1], e.g. 0.95 keeps 95% "
                         f"of the baseline; got {value:g}{hint}")
    return value


def _increase(value: float, field: str) -> float:
    # A relative increase of a lower-is-better metric: 0.05 allows quantized up to 5% above baseline.
    if not 0 < value < 10:
        hint = f"; for {value:g}% write {value / 100:g}" if 10 <= value <= 1000 else ""
        raise ValueError(f"{field} is a relative increase (quantized / baseline - 1) in (0, 10), e.g. 0.05 allows "
                         f"5% above the baseline; got {value:g}{hint}")
    return value


class GateSection(Closed):
    """Thresholds of the accuracy gates (pipeline/accuracy/gates.py). Each metric is judged on the paired
    bootstrap 95% interval of its recovery (pipeline/accuracy/stats.py): pass when the whole interval
    clears the threshold, fail when all of it misses, inconclusive when it straddles."""

    default_min_recovery: float = Field(0.95, description="minimum quantized/baseline per metric, in (0, 1]")
    overrides: dict[str, float] = Field(default_factory=dict, description="per-metric min recovery, in (0, 1]")
    default_max_increase: float | None = Field(
        None, description="lower-is-better metrics (perplexity, bits per byte): maximum relative increase of quantized "
                          "over baseline, e.g. 0.10 = at most 10% worse; unset: 1/default_min_recovery - 1 (+5.26% at 0.95)")
    max_increase: dict[str, float] = Field(
        default_factory=dict, description="per lower-is-better metric: maximum relative increase, > 0")
    inconclusive: str = Field(
        "refuse", description="an inconclusive gate (interval straddles a threshold): refuse (do not publish) or "
                              f"publish. The rule: {GATE_RULE}")

    @field_validator("default_max_increase")
    @classmethod
    def _default_increase(cls, value: float | None) -> float | None:
        return None if value is None else _increase(value, "default_max_increase")

    @field_validator("max_increase")
    @classmethod
    def _increases(cls, value: dict[str, float]) -> dict[str, float]:
        for metric, limit in value.items():
            _increase(limit, f"the maximum increase for {metric[:60]!r}")
        return value

    @field_validator("inconclusive")
    @classmethod
    def _inconclusive(cls, value: str) -> str:
        if value not in INCONCLUSIVE_POLICIES:
            raise ValueError(f"must be one of {', '.join(INCONCLUSIVE_POLICIES)}, got {value[:40]!r}; write "
                             "`inconclusive: refuse` (an inconclusive gate does not publish, the default) or "
                             "`inconclusive: publish`")
        return value

    @field_validator("default_min_recovery")
    @classmethod
    def _default_is_a_ratio(cls, value: float) -> float:
        return _recovery(value, "default_min_recovery")

    @field_validator("overrides")
    @classmethod
    def _overrides_are_ratios(cls, value: dict[str, float]) -> dict[str, float]:
        for metric, minimum in value.items():
            _recovery(minimum, f"the override for {metric[:60]!r}")
        return value


class EvalSection(Closed):
    suite: str = Field(description="eval suite name (eval/suites/<name>.yaml)")
    gates: GateSection = GateSection()
    strict: bool = Field(False, description="a failed gate makes the evaluate stage exit non-zero")

    @field_validator("suite")
    @classmethod
    def _plain_suite(cls, value: str) -> str:
        return plain_name(value, "eval suite", "eval/suites")
