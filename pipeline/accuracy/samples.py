"""Per-document results of a suite run (lm-eval `log_samples`), and their pairing for the gates.

A suite run keeps, per leaf task, each document's id, lm-eval's hash of the document, the
per-document value of every metric (0/1 for acc; (loglikelihood, words|bytes) for the perplexity
metrics, exactly as lm-eval's `process_results` returns them, lm_eval/api/task.py 0.4.13) and, for
multiple choice, the index of the answer the model picked. The stage writes this table as
`samples.json` beside `metrics.json`; `pair` lines up a baseline and a quantized table by document
id (and checks the documents are the same by hash) for pipeline/accuracy/stats.py.

Pure functions: the lm-eval output goes in as plain dicts, the table comes out as plain JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.accuracy.stats import AGGREGATIONS, Aggregation, aggregate
from pipeline.core.errors import StageInputError

SAMPLES_FILE = "samples.json"
TABLE_FORMAT = 1
# lm-eval's point estimate and the same aggregation over the logged documents agree to float
# rounding (sums in another order); anything larger means the table is not what lm-eval scored.
_AGREEMENT_REL_TOL = 1e-6


def document_table(samples: Mapping[str, list[dict]], configs: Mapping[str, Mapping[str, Any]],
                   groups: Mapping[str, list[str]]) -> dict[str, Any]:
    """The per-document table of one lm-eval run from its `samples` and `configs` outputs."""
    tasks: dict[str, Any] = {}
    for task, examples in sorted(samples.items()):
        config = configs.get(task) or {}
        aggregations = _aggregations(config)
        by_doc: dict[int, dict[str, Any]] = {}
        for ex in examples:
            doc = by_doc.setdefault(int(ex["doc_id"]), {"hash": ex["doc_hash"], "values": {}})
            for name in ex["metrics"]:
                doc["values"][f"{name},{ex['filter']}"] = _plain(ex[name])
            if config.get("output_type") == "multiple_choice" and "choice" not in doc:
                doc["choice"] = int(np.argmax([float(resp[0]) for resp in ex["filtered_resps"]]))
        ids = sorted(by_doc)
        metric_keys = sorted({k for d in by_doc.values() for k in d["values"]})
        tasks[task] = {
            "doc_ids": ids,
            "doc_hashes": [by_doc[i]["hash"] for i in ids],
            "choices": [by_doc[i]["choice"] for i in ids] if all("choice" in by_doc[i] for i in ids) and ids else None,
            "metrics": {k: {"aggregation": aggregations.get(k.split(",", 1)[0], "mean"),
                            "values": [by_doc[i]["values"].get(k) for i in ids]} for k in metric_keys},
        }
    return {"format": TABLE_FORMAT, "tasks": tasks, "groups": {k: list(v) for k, v in groups.items() if v}}


def _aggregations(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for entry in config.get("metric_list") or []:
        agg = entry.get("aggregation")
        name = agg if isinstance(agg, str) else getattr(agg, "__name__", None)
        if name is not None:
            out[entry["metric"]] = name
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [float(v) for v in value]
    return float(value)


@dataclass(frozen=True)
class Paired:
    """One gated metric's per-document values of both models, in the same document order."""

    baseline: np.ndarray
    quantized: np.ndarray
    aggregation: Aggregation
    n: int


def leaves(task: str, groups: Mapping[str, list[str]]) -> Iterable[str]:
    children = groups.get(task)
    if not children:
        yield task
        return
    for child in children:
        yield from leaves(child, groups)


def pair(baseline: Mapping[str, Any], quantized: Mapping[str, Any], metric_key: str, where: str) -> Paired:
    """Line up `metric_key` ("task/metric,filter"; a group's documents are its leaves', concatenated)
    of two tables by document id. Refuses tables whose documents differ (`where` names them)."""
    task, metric = metric_key.split("/", 1)
    b_rows, q_rows, aggregation = [], [], None
    for leaf in leaves(task, baseline.get("groups") or {}):
        b_task, q_task = _task(baseline, leaf, where, "baseline"), _task(quantized, leaf, where, "quantized")
        if b_task["doc_ids"] != q_task["doc_ids"] or b_task["doc_hashes"] != q_task["doc_hashes"]:
            raise StageInputError(where, f"task {leaf!r}: the baseline and the quantized model were scored on different "
                                  f"documents ({len(b_task['doc_ids'])} vs {len(q_task['doc_ids'])}, or other text).",
                                  "re-run both on the same suite data (dvc repro baseline and evaluate).")
        b_metric, q_metric = _metric(b_task, leaf, metric, where, "baseline"), _metric(q_task, leaf, metric, where, "quantized")
        agg = b_metric["aggregation"]
        if agg not in AGGREGATIONS or agg != q_metric["aggregation"]:
            raise StageInputError(where, f"{leaf}/{metric}: lm-eval aggregation {agg!r} (quantized: "
                                  f"{q_metric['aggregation']!r}) has no paired bootstrap here.",
                                  f"gate on metrics aggregated by one of: {', '.join(AGGREGATIONS)}.")
        if aggregation is not None and agg != aggregation:
            raise StageInputError(where, f"{metric_key}: its subtasks aggregate differently ({aggregation}, {agg}).",
                                  "gate on the subtasks' metric instead of the group's.")
        aggregation = agg
        b_rows += b_metric["values"]
        q_rows += q_metric["values"]
    if any(v is None for v in b_rows + q_rows):
        raise StageInputError(where, f"{metric_key}: some documents have no value for it.", "re-run the evaluation.")
    return Paired(np.asarray(b_rows, dtype=np.float64), np.asarray(q_rows, dtype=np.float64), aggregation, len(b_rows))


def _task(table: Mapping[str, Any], leaf: str, where: str, side: str) -> Mapping[str, Any]:
    task = (table.get("tasks") or {}).get(leaf)
    if task is None:
        raise StageInputError(where, f"the {side}'s per-document results have no task {leaf!r}.",
                              f"re-run the {side} evaluation with this suite.")
    return task


def _metric(task: Mapping[str, Any], leaf: str, metric: str, where: str, side: str) -> Mapping[str, Any]:
    entry = task["metrics"].get(metric)
    if entry is None:
        raise StageInputError(where, f"the {side}'s per-document results of {leaf!r} have no {metric!r} "
                              f"(they have: {', '.join(task['metrics']) or 'nothing'}).", f"re-run the {side} evaluation.")
    return entry


def check_agrees(paired_values: np.ndarray, aggregation: Aggregation, reported: float, what: str, where: str) -> None:
    """The per-document values reproduce lm-eval's reported aggregate (else the table is not the run)."""
    value = float(aggregate(paired_values, aggregation))
    if not np.isclose(value, reported, rtol=_AGREEMENT_REL_TOL, atol=1e-12):
        raise StageInputError(where, f"{what}: the per-document results give {value:.8g}, lm-eval reported "
                              f"{reported:.8g}.", "re-run the evaluation: the samples are not from this run.")


def disagreement(baseline: Mapping[str, Any], quantized: Mapping[str, Any], task: str) -> float | None:
    """Fraction of multiple-choice documents where the two models pick different answers."""
    b, q = (baseline.get("tasks") or {}).get(task), (quantized.get("tasks") or {}).get(task)
    if not b or not q or b.get("choices") is None or q.get("choices") is None or b["doc_ids"] != q["doc_ids"]:
        return None
    return float(np.mean(np.asarray(b["choices"]) != np.asarray(q["choices"])))


def paired_intervals(baseline: Mapping[str, Any], quantized: Mapping[str, Any], metric_keys: Iterable[str],
                     baseline_metrics: Mapping[str, float], quantized_metrics: Mapping[str, float],
                     where: str) -> dict[str, Any]:
    """The paired bootstrap interval of quantized / baseline for each gated metric
    (pipeline/accuracy/stats.py), after checking both tables reproduce lm-eval's reported values."""
    from pipeline.accuracy.stats import paired_ratio_interval

    out = {}
    for key in metric_keys:
        paired = pair(baseline, quantized, key, where)
        if key in baseline_metrics:
            check_agrees(paired.baseline, paired.aggregation, baseline_metrics[key], f"{key} (baseline)", where)
        if key in quantized_metrics:
            check_agrees(paired.quantized, paired.aggregation, quantized_metrics[key], f"{key} (quantized)", where)
        out[key] = paired_ratio_interval(paired.baseline, paired.quantized, paired.aggregation)
    return out
