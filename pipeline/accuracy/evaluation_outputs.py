"""What the baseline and evaluate stages write: metrics.json (the suite result and the suite's
definition), samples.json (per-document results), the gate's intervals and its Markdown, and the
flat evaluate results the KPIs are chosen from (pipeline/handoff/kpis.py)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pipeline.accuracy.gates import GateReport
from pipeline.accuracy.stats import CONFIDENCE, METHOD, RESAMPLES, SEED
from pipeline.accuracy.suites import EvalSuite, SuiteResult, suite_definition
from pipeline.core.errors import StageInputError
from pipeline.core.files import write_json
from pipeline.recipe.loading import Recipe

METRICS_FILE = "metrics.json"
GATE_MARKDOWN = "gate_report.md"


def suite_metrics(result: SuiteResult, suite: EvalSuite, path: str, device: str | None, dtype: str | None) -> dict[str, Any]:
    definition = suite_definition(suite)
    return {**result.to_dict(), "path": path, "device": device, "dtype": dtype,
            "suite_definition": definition, "suite_sha256": json_digest(definition)}


def gate_markdown(recipe: Recipe, path: str, report: GateReport) -> str:
    gates = recipe.spec.eval.gates
    head = (f"# Accuracy gate: {recipe.id}\n\nVerdict: **{report.verdict.upper()}** "
            f"(quantized model scored via `{path}`; default minimum recovery {gates.default_min_recovery:g}; "
            f"intervals: {METHOD}, {CONFIDENCE:.0%}, {RESAMPLES} resamples, seed {SEED}; PASS when the interval "
            f"clears the threshold, FAIL when it is entirely on the wrong side, INCONCLUSIVE otherwise, which "
            f"{'publishes' if report.inconclusive_publishes else 'does not publish'}: eval.gates.inconclusive "
            f"{gates.inconclusive}).\n\n")
    return head + report.to_markdown()


def flat_metrics(recipe: Recipe, result: SuiteResult, path: str, report: GateReport, seconds: float,
                 agreement: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evaluate results the KPIs are chosen from (pipeline/handoff/kpis.py): one entry per gated
    metric, the verdict as 1/0 (numbers plot and diff) and as text, the lowest finite recovery,
    and how the numbers were produced (`path`, pipeline/accuracy/scoring.py Scored.path)."""
    rows = report.to_dict()["rows"]
    deciding = [r for r in report.rows if r.decides]
    recoveries = [r.recovery for r in deciding if r.recovery is not None and math.isfinite(r.recovery)]
    lows = [r.recovery_lower for r in deciding if r.recovery_lower is not None and math.isfinite(r.recovery_lower)]
    return {
        "recipe": recipe.id,
        "model": recipe.model.name,
        "format": recipe.spec.quant.format,
        "kv_cache_dtype": recipe.spec.quant.kv_cache_dtype,
        "suite": result.suite,
        "path": path,
        **served_labels(result),
        "gate_passed": int(report.verdict == "pass"),
        "gate_verdict": report.verdict,
        "gate_publishes": int(report.publishes),
        "failed_metrics": [r.metric for r in report.failed],
        "gates_failed": len(report.failed),
        "gates_inconclusive": len(report.inconclusive),
        "min_recovery": min(recoveries) if recoveries else None,
        "min_recovery_lower": min(lows) if lows else None,
        "agreement": agreement or {},
        "eval_seconds": result.seconds,
        "stage_seconds": round(seconds, 3),
        "gates": {r["metric"]: {**{k: r[k] for k in ("baseline", "quantized", "recovery", "recovery_lower",
                                                      "recovery_upper", "threshold", "form", "max_increase",
                                                      "increase", "increase_lower", "increase_upper", "n", "method",
                                                      "direction", "verdict", "reason", "decides")},
                                "passed": int(r["verdict"] == "pass")}
                  for r in rows},
    }


def json_digest(data: Any) -> str:
    """sha256 of a JSON value, independent of key order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def write_documents(out_dir: Path, result: SuiteResult) -> None:
    from pipeline.accuracy.samples import SAMPLES_FILE

    if result.documents is not None:
        write_json(out_dir / SAMPLES_FILE, result.documents)


def gate_intervals(baseline_metrics: dict[str, float], baseline_documents: dict[str, Any] | None,
                   result: SuiteResult, suite: EvalSuite, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Paired bootstrap intervals per gated metric, and how often the two models' answers differ
    (per multiple-choice task: the rate that sizes the suite, README "Accuracy gates")."""
    from pipeline.accuracy.samples import disagreement, leaves, paired_intervals

    if result.documents is None or baseline_documents is None:
        raise StageInputError(str(out_dir), "no per-document results to pair.", "re-run baseline and evaluate.")
    where = f"{out_dir} vs its baseline"
    intervals = paired_intervals(baseline_documents, result.documents, suite.directions(),
                                 baseline_metrics, result.metrics, where)
    agreement = {}
    groups = result.documents.get("groups") or {}
    for task in suite.tasks:
        for leaf in leaves(task.name, groups):  # a pooled group's members, each on its own
            rate = disagreement(baseline_documents, result.documents, leaf)
            if rate is not None:
                agreement[leaf] = {"disagreement": round(rate, 6), "n": len(result.documents["tasks"][leaf]["doc_ids"])}
    return intervals, agreement


def served_labels(result: SuiteResult) -> dict[str, Any]:
    """Engine, version and device of a served score, flat for `dvc metrics show` and the report."""
    served = result.extra.get("served")
    if not served:
        return {}
    return {"served": 1, "engine": served["engine"], "engine_version": served["engine_version"],
            "device": served["device"], "checkpoint_sha256": served["checkpoint_sha256"],
            "weights_checked": int(served.get("weights_checked", True))}
