"""The effective-bits / recovery frontier: Pareto set, cheapest passing variant, table and plot."""

from __future__ import annotations

import pytest

from pipeline.handoff.models import CalibrateDetails
from pipeline.reporting.frontier import (
    MetricResult,
    Variant,
    cheapest_passing,
    figure,
    markdown,
    pareto,
    plot,
    variant_from_outputs,
)


def _v(name, bits, acc, passed, ppl=1.0):
    verdict = {True: "pass", False: "fail"}.get(passed, passed)  # or a verdict string: "inconclusive"
    return Variant(name, "nvfp4", bits, None, 5.0, {"acc": MetricResult(acc), "ppl": MetricResult(ppl)}, verdict)


def test_pareto_and_cheapest_passing():
    a, b, c, d = _v("a", 4.5, 0.90, False), _v("b", 5.0, 0.96, True), _v("c", 5.5, 0.95, True), _v("d", 8.0, 0.99, True)
    assert [v.name for v in pareto([a, b, c, d])] == ["a", "b", "d"]  # c: more bits, lower worst recovery than b
    assert cheapest_passing([a, b, c, d]).name == "b"
    assert cheapest_passing([a, b, c, d], max_bits=4.9) is None
    text = markdown([a, b, c, d], ["acc", "ppl"], 0.95, 5.0, "figures/f.png")
    assert "**b** (5.000 bits)" in text and "| a * |" in text and "| c |" in text


def test_intervals_flow_from_gate_rows(tmp_path):
    row = {"metric": "acc", "recovery": 0.97, "recovery_lower": 0.94, "recovery_upper": 0.99}
    m = MetricResult.from_gate_row(row)
    assert (m.point, m.lower, m.upper) == (0.97, 0.94, 0.99) and m.cell() == "0.9700 [0.940, 0.990]"
    assert MetricResult.from_gate_row({"recovery": "inf"}).point is None
    details = CalibrateDetails.model_validate(
        {"results": {"perplexity_baseline": 60.0, "perplexity_quantized": 67.2, "effective_bits": 5.01,
                     "whole_checkpoint_bits": 7.1, "perplexity_delta_pct": 12.0},
         "algorithm": None, "auto": {"target_bits": 5.0}, "overrides": {}, "layer_formats": {"fp8": 3, "nvfp4": 200}})
    v = variant_from_outputs("nvfp4-auto-5", "nvfp4", details, {"verdict": "fail", "rows": [row]}, None)
    assert v.passed is False and v.note == "max, auto 5 bits, fp8 3 / nvfp4 200" and v.metrics["acc"].lower == 0.94
    assert variant_from_outputs("x", "fp8", CalibrateDetails(), None, None) is None
    path = plot([v, _v("b", 4.5, 0.9, False)], ["acc", "ppl"], 0.95, tmp_path / "f.png")
    assert path.stat().st_size > 1000


def test_markdown_without_a_bits_goal_names_the_cheapest_passing_variant():
    a, b = _v("a", 8.0, 0.99, True), _v("b", 4.5, 0.9, False)
    assert "Cheapest variant that passes its gates: **a** (8.000 bits)." in markdown([a, b], ["acc"], 0.95, None, None)


def test_an_inconclusive_verdict_is_shown_as_such_and_is_not_passing():
    """nvfp4-auto-6's gate said inconclusive; the frontier table had printed it as "fail"."""
    a, b = _v("a", 6.0, 0.966, "inconclusive"), _v("b", 8.0, 0.99, True)
    assert not a.passed and cheapest_passing([a, b]).name == "b"
    text = markdown([a, b], ["acc"], 0.95, None, None)
    assert "| inconclusive | - |" in text and "| fail |" not in text


def test_each_metric_is_shown_and_drawn_against_its_own_gate(tmp_path):
    """One 0.95 line for every metric put a passing perplexity point below it (issue 26): a max-increase
    gate's metric is shown as its increase, against its own maximum, in its own panel."""
    acc = {"metric": "acc", "recovery": 0.9861, "recovery_lower": 0.9665, "recovery_upper": 1.0055,
           "threshold": 0.95, "form": "min_recovery"}
    ppl = {"metric": "ppl", "recovery": 1 / 1.057, "recovery_lower": 1 / 1.070, "recovery_upper": 1 / 1.046,
           "threshold": 1 / 1.366, "form": "max_increase", "max_increase": 0.366}
    details = CalibrateDetails.model_validate({"results": {"perplexity_baseline": 60.0, "perplexity_quantized": 62.0,
                                                           "effective_bits": 8.0}})
    fp8 = variant_from_outputs("fp8", "fp8", details, {"verdict": "pass", "rows": [acc, ppl]}, "v1.0.0")
    assert fp8.metrics["ppl"].cell() == "+5.7% [+4.6%, +7.0%]"
    text = markdown([fp8, _v("b", 4.5, 0.9, False)], ["acc", "ppl"], 0.95, None, None)
    assert "| acc (>= 0.95) | ppl (<= +36.6%) |" in text and "| 0.9861 [0.967, 1.006] | +5.7% [+4.6%, +7.0%] |" in text
    assert plot([fp8], ["acc", "ppl"], 0.95, tmp_path / "f.png").stat().st_size > 1000
    recovery_ax, increase_ax = figure([fp8], ["acc", "ppl"], 0.95).axes
    rules = {ax.get_ylabel(): [(line.get_label(), line.get_ydata()[0]) for line in ax.lines
                               if line.get_linestyle() == "--"] for ax in (recovery_ax, increase_ax)}
    assert rules == {"recovery (quantized / baseline)": [("acc gate >= 0.95", 0.95)],
                     "increase over baseline, %": [("ppl gate <= +36.6%", pytest.approx(36.6))]}
