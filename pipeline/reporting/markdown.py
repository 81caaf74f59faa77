"""report.md: one section function per part, in this order: intro, one per model (its table, recovery
plot, held-out perplexity, served next to simulated, the gates that did not pass), throughput, the
sections other stages produced (the GPU comparison, the frontier), publish, missing results."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.core.errors import StageInputError
from pipeline.core.layout import FIGURES_DIR
from pipeline.recipe.eval_schema import GATE_RULE
from pipeline.reporting.entries import TargetEntry, Throughput
from pipeline.reporting.plots import recovery_figure_name

_MARK = {"pass": "", "fail": " ✗", "inconclusive": " ?"}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _opt(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _model_table(targets: Sequence[TargetEntry]) -> str:
    metrics: dict[str, str] = {}  # metric -> how its gate states it (GateRow.interval_text's form)
    for t in targets:
        report = t.gate
        for r in report.rows if report else ():
            metrics.setdefault(r.metric, "increase" if r.form == "max_increase" else "recovery")
    head = [
        "recipe",
        "GPU",
        "TP",
        "gate",
        *(f"{form} {m} [95% CI]" for m, form in metrics.items()),
        "weights GiB",
        "KV capacity (tokens)",
        "output tok/s (trtllm-bench run)",
        "J/token",
        "$/Mtok",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for t in targets:
        report = t.gate
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
    return f"{tput.output_tok_s:,.0f} ({label})"


def _perplexity_table(targets: Sequence[TargetEntry]) -> str:
    lines = ["| recipe | GPU | baseline ppl | quantized ppl | change |", "|---|---|---:|---:|---:|"]
    for t in targets:
        if t.perplexity:
            p = t.perplexity
            lines.append(f"| {t.recipe} | {t.gpu} | {p.baseline:.3f} | {p.quantized:.3f} | "
                         f"{100 * (p.quantized / p.baseline - 1):+.1f}% |")
    return "\n".join(lines) + "\n"


def served_table(targets: Sequence[TargetEntry]) -> str:
    """Per metric: the evaluate stage's simulation (KV numerics of the target GPU's engine), the
    simulation with the serving engine's KV numerics (same as the first without an FP8 KV cache),
    and the served score; recoveries against the in-process and the served baseline. `n` is how many
    documents each scored: the served run and the as-served simulation score a subset (dvc.yaml
    serve-eval --limit), the target simulation the whole suite, so their intervals differ in width.
    The engine's start time and decode rate are this run's measurements, in the stage's timings file
    (metrics/run/serve-eval/<target>.json), not in the report: they differ on every run."""
    header = ("| target | engine | device | metric | simulated (target KV) | "
              "simulated (as-served KV) | served | n sim / served | recovery (increase for max-increase gates) "
              "sim / as-served sim / served |")
    lines = [header, "|---|---|---|---|---:|---:|---:|---:|---|"]
    notes = []
    for t in targets:
        sv = t.served
        if sv is None:
            continue
        if not sv.served:
            lines.append(f"| {t.target} | not served here: {sv.reason} | | | | | | | |")
            continue
        simulated = {r.metric: r for r in (t.gate.rows if t.gate else ())}
        engine = f"{sv.engine} {sv.engine_version or ''}".strip()
        for row in sv.gate.rows if sv.gate else ():
            sim = simulated.get(row.metric)
            # Without the FP8 KV cache served, no simulation matches what was served: shown as "-".
            as_served = (sv.simulated_as_served or {}).get(row.metric) if sv.simulated_as_served else (
                sim.quantized if sim and not sv.kv_not_served else None)
            # The as-served simulation scores the served subset (dvc.yaml serve-eval --limit), so it is
            # compared with the baseline on that subset (the served BF16 baseline, the gate row's), not
            # with the full-suite baseline of the target simulation.
            subset_baseline = row.baseline if sv.simulated_as_served else (sim.baseline if sim else None)
            as_served_recovery = (_recovery(subset_baseline, as_served, sim.direction)
                                  if sim and as_served and subset_baseline else None)
            lines.append(
                f"| {t.target} | {engine} | {sv.device or '-'} | "
                f"{row.metric} | {_opt(sim.quantized if sim else None, '.4g')} | "
                f"{_opt(as_served, '.4g')} | {_opt(row.quantized, '.4g')} | {_n(sim.n if sim else None)} / {_n(row.n)} | "
                + " / ".join(_on_terms(r, row.form) for r in (sim.recovery if sim else None, as_served_recovery,
                                                               row.recovery))
                + f" ({row.threshold_text}){_MARK[row.verdict]} |")
        if sv.kv_not_served:
            notes.append(f"- {t.target}: {sv.kv_not_served}")
        elif sv.simulated_kv or sv.simulated_as_served_kv:
            notes.append(f"- {t.target}: target KV numerics {sv.simulated_kv or '-'}; as-served KV numerics "
                         f"{sv.simulated_as_served_kv or 'same (no FP8 KV cache)'}")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _on_terms(recovery: float | None, form: str) -> str:
    """A recovery as its gate states it: itself, or for a max-increase gate the increase 1/recovery - 1."""
    if recovery is None:
        return "—"
    if form == "max_increase":
        # A recovery of 0 is an infinite increase (the quantized perplexity overflowed): shown, not hidden.
        return "+inf%" if recovery == 0 else f"{(1 / recovery - 1) * 100:+.1f}%"
    return f"{recovery:.3f}"


def _n(count: int | None) -> str:
    return "—" if not count else f"{count:,}"  # 0: a point estimate without per-document results


def _recovery(baseline: float, value: float, direction: str) -> float | None:
    if not baseline or not value:
        return None
    return value / baseline if direction == "higher" else baseline / value


def report_markdown(
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
        "lower-is-better ones (1.0 = no loss); a metric gated on a maximum increase (perplexity-type) is "
        "shown as that increase; ✗ marks a metric that fails its own gate, ? one the interval cannot decide. "
        "Throughput is "
        "output tok/s of trtllm-bench's offline run, labelled *predicted* (pipeline/sizing/perfmodel.py; "
        "the roofline is a ceiling and is not shown as a prediction) or *measured* (trtllm-bench); J/token "
        "and $/Mtok are of that run, J/token labelled by its power source (*nvml* measured, *tdp* "
        "assumed). The gate column names how "
        "the quantized scores were produced (simulated-cpu, modelopt-cuda, or served-<engine>).\n"
    )


def _model_section(model: str, targets: Sequence[TargetEntry], plots: Sequence[Path]) -> str:
    out = [f"## {model}\n", _model_table(targets)]
    plot = next((p for p in plots if p.name == recovery_figure_name(model)), None)
    if plot:
        out.append(f"![recovery for {model}]({FIGURES_DIR}/{plot.name})\n")
    if any(t.perplexity for t in targets):
        out.append("Held-out perplexity measured by the calibrate stage:\n")
        out.append(_perplexity_table(targets))
    if any(t.served for t in targets):
        out.append("Served (a real engine on this machine, scored through its OpenAI API) next to simulated "
                   "(in-process fake quant); which of them gates is the rule under Publish:\n")
        out.append(served_table(targets))
    for t in targets:
        report = t.gate
        if report and report.verdict != "pass":
            out.append(f"### {t.target}: accuracy gate {'failed' if report.verdict == 'fail' else report.verdict}\n")
            out.append(report.to_markdown())
    return "\n".join(out)


def _throughput_section(plots: Sequence[Path]) -> str:
    if not any(p.name == "throughput.png" for p in plots):
        return ""
    return f"## Throughput\n\n![output tok/s per target]({FIGURES_DIR}/throughput.png)\n"


def _publish_section(entries: Sequence[TargetEntry]) -> str:
    rows = [e for e in entries if e.publish is not None]
    if not rows:
        return ""
    lines = ["## Publish\n", f"The rule: {GATE_RULE}\n", "| model | target | published | gated on | why |",
             "|---|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {e.model} | {e.target} | {e.publish.version if e.publish.published else 'refused'} | "
                     f"{e.publish.gated_on or '-'} | {'' if e.publish.published else e.publish.reason or ''} |")
    return "\n".join(lines) + "\n"


def gpu_comparison_section(compare_dir: Path, report_dir: Path) -> str:
    """The gpu-compare stage's section (pipeline/reporting/gpu_comparison.py), its figures linked from the report."""
    from pipeline.reporting.gpu_comparison import markdown

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
