import json
import math

import pytest

from pipeline.accuracy.gates import GatePolicy, GateReport, evaluate_gates, recovery
from pipeline.core.errors import RecipeError

ACC = "mmlu/acc,none"
PPL = "forge_prose/word_perplexity,none"
DIRS = {ACC: "higher", PPL: "lower"}


def test_recovery_direction():
    assert recovery(0.60, 0.57, "higher") == pytest.approx(0.95)
    assert recovery(10.0, 12.5, "lower") == pytest.approx(0.8)
    # a lower perplexity after quantization is a recovery above 1
    assert recovery(10.0, 8.0, "lower") == pytest.approx(1.25)
    with pytest.raises(ValueError, match="direction"):
        recovery(1.0, 1.0, "up")


def test_pass_and_fail_per_direction():
    report = evaluate_gates({ACC: 0.70, PPL: 15.30}, {ACC: 0.69, PPL: 23.47}, DIRS, GatePolicy(0.95))
    acc, ppl = report.rows
    assert (acc.metric, acc.verdict, acc.threshold) == (ACC, "pass", 0.95)
    assert acc.recovery == pytest.approx(0.69 / 0.70)
    assert (ppl.verdict, ppl.direction) == ("fail", "lower")
    assert ppl.recovery == pytest.approx(15.30 / 23.47)
    assert ppl.reason == "increase +53.4% > +5.3%"  # no per-document results: the point decides
    assert (ppl.form, ppl.method, ppl.n) == ("max_increase", "point estimate (no per-document results)", 0)
    assert report.verdict == "fail"
    assert report.failed == (ppl,)


def test_threshold_boundary_counts_as_pass():
    # 0.57 / 0.60 is 0.9499999999999998 in floating point; exactly at the threshold must pass.
    at = evaluate_gates({ACC: 0.60}, {ACC: 0.57}, {ACC: "higher"}, GatePolicy(0.95))
    assert at.verdict == "pass"
    just_below = evaluate_gates({ACC: 0.60}, {ACC: 0.5699}, {ACC: "higher"}, GatePolicy(0.95))
    assert just_below.verdict == "fail"
    lower_at = evaluate_gates({PPL: 19.0}, {PPL: 20.0}, {PPL: "lower"}, GatePolicy(0.95))
    assert lower_at.rows[0].recovery == pytest.approx(0.95) and lower_at.verdict == "pass"


def test_missing_metric_fails_with_reason():
    report = evaluate_gates({ACC: 0.7}, {PPL: 15.0}, DIRS, GatePolicy(0.9))
    acc, ppl = report.rows
    assert (acc.verdict, acc.reason, acc.recovery) == ("fail", "missing in quantized results", None)
    assert (ppl.verdict, ppl.reason) == ("fail", "missing in baseline results")
    both = evaluate_gates({}, {}, {ACC: "higher"}, GatePolicy(0.9))
    assert both.rows[0].reason == "missing in baseline and quantized results"


def test_zero_baseline_is_explicit():
    # gsm8k of a tiny model can be 0 for both: no change, not a division by zero
    same = evaluate_gates({ACC: 0.0}, {ACC: 0.0}, {ACC: "higher"}, GatePolicy(0.95)).rows[0]
    assert (same.recovery, same.verdict) == (1.0, "pass")
    assert "both 0" in same.reason
    better = evaluate_gates({ACC: 0.0}, {ACC: 0.1}, {ACC: "higher"}, GatePolicy(0.95)).rows[0]
    assert math.isinf(better.recovery) and better.verdict == "pass"
    # lower-is-better with a 0 baseline and a worse quantized value: recovery 0, fails
    worse = evaluate_gates({PPL: 0.0}, {PPL: 2.0}, {PPL: "lower"}, GatePolicy(0.95)).rows[0]
    assert (worse.recovery, worse.verdict) == (0.0, "fail")


def test_non_finite_and_negative_values_fail():
    nan = evaluate_gates({ACC: float("nan")}, {ACC: 0.5}, {ACC: "higher"}, GatePolicy(0.9)).rows[0]
    assert (nan.verdict, nan.reason) == ("fail", "value is not finite (NaN or inf)")
    neg = evaluate_gates({ACC: -2.0}, {ACC: -1.0}, {ACC: "higher"}, GatePolicy(0.9)).rows[0]
    assert (neg.verdict, neg.reason) == ("fail", "recovery is only defined for non-negative metrics")


def test_overrides_apply_per_metric():
    policy = GatePolicy(0.99, overrides={PPL: 0.60})
    report = evaluate_gates({ACC: 0.70, PPL: 15.30}, {ACC: 0.695, PPL: 23.47}, DIRS, policy)
    assert [(r.threshold, r.verdict) for r in report.rows] == [(0.99, "pass"), (0.60, "pass")]
    assert report.verdict == "pass"


def test_override_for_unknown_metric_is_an_error():
    with pytest.raises(RecipeError) as err:
        evaluate_gates(
            {ACC: 0.7},
            {ACC: 0.7},
            {ACC: "higher"},
            GatePolicy(0.95, {"mmlu/acc": 0.9}),
            where="recipes/x/fp8.yaml: gates",
        )
    assert str(err.value) == (
        "recipes/x/fp8.yaml: gates.overrides: override(s) for metric(s) not produced by the eval suite: mmlu/acc. "
        "Fix: use one of: mmlu/acc,none."
    )


def test_invalid_policy_and_empty_suite():
    with pytest.raises(
        RecipeError, match="default_min_recovery: minimum recovery must be a positive finite number, got 0"
    ):
        GatePolicy(0)
    with pytest.raises(RecipeError, match=r"gate policy: x: .*got -0.5"):
        GatePolicy(0.9, {"x": -0.5})
    with pytest.raises(RecipeError, match="no metrics to gate"):
        evaluate_gates({ACC: 1.0}, {ACC: 1.0}, {}, GatePolicy(0.9))


def test_undeclared_metrics_are_not_gated():
    report = evaluate_gates(
        {ACC: 0.7, "extra/x,none": 1.0}, {ACC: 0.7, "extra/x,none": 0.0}, {ACC: "higher"}, GatePolicy(0.95)
    )
    assert [r.metric for r in report.rows] == [ACC]
    assert report.verdict == "pass"


def test_json_round_trip_and_markdown():
    report = evaluate_gates({ACC: 0.0, PPL: 15.30}, {ACC: 0.2, PPL: 23.47}, DIRS, GatePolicy(0.95))
    text = report.to_json()
    data = json.loads(text)  # strict JSON: no Infinity token
    assert "Infinity" not in text
    assert data["verdict"] == "fail"
    assert data["rows"][0]["recovery"] == "inf"
    assert GateReport.from_dict(data) == report
    md = report.to_markdown()
    assert "| mmlu/acc,none | higher | 0 | 0.2 | ∞ | >= 0.95 | 0 | PASS |" in md
    assert (
        "| forge_prose/word_perplexity,none | lower | 15.3 | 23.47 | +53.4% | <= +5.3% | 0 | FAIL | increase +53.4% > +5.3% |"
        in md
    )
