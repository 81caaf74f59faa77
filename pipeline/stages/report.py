"""Stage `report`: one comparison across every planned target, from the stages' outputs.

In: plan.yaml (the targets `dvc repro` built: the embedded default's, or with --frontier every
variant's, recipes with `frontier: true` too; pipeline/planning/dvc_plan.py) and the data directory the stages write, read
through their manifests: quantized/<recipe> (held-out perplexity, manifest `details.results`),
eval/<recipe> (gate_report.json), bundles/<target> (the memory plan), throughput/<target>
(throughput.json), published/<target> (receipt.json). DVC metrics files are never read back
(pipeline/handoff/kpis.py). Out (`--out`): report.md, figures/*.png, plots/*.csv|json and
readme_results.md (pipeline/reporting/report.py); on stderr, a one-screen summary of what was published
and what was refused and why: `dvc repro` runs this stage last, so its log ends with it.
A planned target whose outputs are absent is listed under "Missing results" with the path that
is missing, never dropped silently. A model with two or more calibrated recipes gets its effective
bits vs recovery section (`frontier_section`; the Pareto math is pipeline/reporting/frontier.py).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.accuracy.evaluation_outputs import METRICS_FILE
from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.errors import StageInputError
from pipeline.core.layout import GATE_REPORT_FILE, MANIFEST_NAME, RECEIPT_FILE, THROUGHPUT_FILE
from pipeline.core.yamlio import load_yaml_file, read_output_json
from pipeline.handoff.models import NotServedDetails
from pipeline.handoff.reader import Opened, open_upstream
from pipeline.planning.dvc_plan import PlannedTarget, in_report
from pipeline.recipe.loading import load_recipe
from pipeline.reporting.frontier import Variant, markdown, plot, variant_from_outputs

log = logging.getLogger(__name__)

EXAMPLE = """example:
  forge report --plan plan.yaml --data data --out reports
"""


@dataclass(frozen=True)
class ReportArgs:
    """`forge report`'s arguments, declared once (pipeline/core/cliargs.py)."""

    plan_path: Path = arg(required=True, flag="plan", help="plan.yaml (forge plan --dvc)")
    data_dir: Path = arg(required=True, flag="data", help="the directory the stages write their outputs into")
    out_dir: Path = arg(required=True, flag="out")
    title: str = arg("forge comparison report")
    gpu_compare_dir: Path | None = arg(flag="gpu-compare",
                                       help="the gpu-compare stage's output directory, to include as a section")
    frontier: bool = arg(False, help="every planned target, the `frontier: true` recipes too (make frontier); "
                                     "without it the embedded default's (make repro)")


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "report", runner(ReportArgs, main),
             help="comparison report across recipes and GPUs (Markdown + PNG + tables + summary)",
             epilog=EXAMPLE)


def main(plan_path: Path, data_dir: Path, out_dir: Path, title: str = "forge comparison report",
         gpu_compare_dir: Path | None = None, frontier: bool = False) -> int:
    from pipeline.reporting.markdown import gpu_comparison_section
    from pipeline.reporting.readme_results import PUBLISHED_FILE, load_published
    from pipeline.reporting.report import summary_lines, write_report

    targets = read_plan_targets(Path(plan_path), frontier)
    collected = collect(targets, Path(data_dir))
    sections = [gpu_comparison_section(Path(gpu_compare_dir), Path(out_dir))] if gpu_compare_dir else []
    if (frontier := frontier_section(targets, Path(data_dir), Path(out_dir))) is not None:
        sections.append(frontier)
    files = write_report(collected.entries, Path(out_dir), title, collected.missing, sections,
                         published=load_published(PUBLISHED_FILE))
    for line in collected.missing:
        log.warning("report: %s", line)
    log.info("report: %s, %d figures, %d of %d targets complete", files.markdown, len(files.plots),
             len(targets) - len({m.split(":")[0] for m in collected.missing}), len(targets))
    for line in summary_lines(collected.entries, collected.missing):
        log.info("%s", line)
    return 0


# ---------------------------------------------------------------------------- reading


def read_plan_targets(plan_path: Path, frontier: bool = True) -> list[PlannedTarget]:
    """The plan's targets; without `frontier`, only the embedded default's (pipeline/planning/dvc_plan.py in_report)."""
    try:
        plan = load_yaml_file(plan_path)
    except OSError as exc:
        raise StageInputError(str(plan_path), f"cannot read the plan ({exc.strerror}).", "run `make plan` (forge plan --dvc).") from None
    targets = (plan or {}).get("targets") if isinstance(plan, dict) else None
    if not isinstance(targets, dict):
        raise StageInputError(str(plan_path), "has no `targets` mapping.", "regenerate it: forge plan --dvc.")
    try:
        return [PlannedTarget(key, Path(t["recipe"]), t["recipe_id"], t["model"], t["gpu"])
                for key, t in targets.items() if in_report(t, frontier)]
    except (KeyError, TypeError) as exc:
        raise StageInputError(f"{plan_path}: targets", f"an entry lacks {exc}.", "regenerate it: forge plan --dvc.") from None


@dataclass(frozen=True)
class Collected:
    entries: list[dict[str, Any]]  # pipeline.reporting.report TargetEntry mappings
    missing: list[str]  # "<target>: <what is missing and what it means>"


@dataclass(frozen=True)
class StageOutputs:
    """What the report reads of one target, None where that stage's output is absent."""

    calibrate: dict[str, Any] | None  # calibrate manifest details.results
    evaluate: dict[str, Any] | None  # {"gate": GateReport dict, "path": how it was scored}
    build: dict[str, Any] | None  # the memory plan (Plan.to_json) the bundle was sized by
    throughput: dict[str, Any] | None  # throughput.json
    publish: dict[str, Any] | None  # receipt.json


CONSEQUENCE = {"calibrate": "no perplexity", "evaluate": "accuracy not gated", "build": "bundle not built",
               "throughput": "throughput stage did not run", "publish": "not published yet"}


def collect(targets: list[PlannedTarget], data_dir: Path) -> Collected:
    entries: list[dict[str, Any]] = []
    missing: list[str] = []
    for target in targets:
        dirs = {
            "calibrate": data_dir / "quantized" / target.recipe_id,
            "evaluate": data_dir / "eval" / target.recipe_id,
            "build": data_dir / "bundles" / target.key,
            "throughput": data_dir / "throughput" / target.key,
            "publish": data_dir / "published" / target.key,
        }
        found = read_outputs(dirs)
        for stage, value in vars(found).items():
            if value is None:
                missing.append(f"{target.key}: {dirs[stage]} missing ({CONSEQUENCE[stage]})")
        try:
            entry = target_entry(target, found)
        except KeyError as exc:
            raise StageInputError(str(dirs["throughput"] if found.throughput else dirs["build"]), f"lacks the key {exc}.",
                                  "re-run the stage that writes it.") from None
        if entry is not None and (served := read_served(data_dir / "eval" / f"{target.key}-served")) is not None:
            entry["served"] = served
        if entry is None:
            missing.append(f"{target.key}: no memory plan (neither build nor throughput output): target not shown")
        else:
            entries.append(entry)
    return Collected(entries, missing)


def read_outputs(dirs: dict[str, Path]) -> StageOutputs:
    # Typed but not re-hashed: the report describes what is on disk; publish verified what it shipped.
    def opened(stage: str) -> Opened | None:
        return open_upstream(dirs[stage], stage, verify=False) if (dirs[stage] / MANIFEST_NAME).is_file() else None

    calibrate, evaluate, build = opened("calibrate"), opened("evaluate"), opened("build")
    gate = read_output_json(dirs["evaluate"] / GATE_REPORT_FILE) if evaluate else None
    results = calibrate.details.results if calibrate else None
    return StageOutputs(
        calibrate=results.model_dump() if results else None,
        evaluate={"gate": gate, "path": getattr(evaluate.details, "path", None),
                  # how often the two models' answers differ, per multiple-choice task (sizes the suite)
                  "agreement": (read_output_json(dirs["evaluate"] / METRICS_FILE) or {}).get("agreement") or {}}
        if evaluate and gate else None,
        build=build.details.plan.model_dump() if build else None,
        throughput=read_output_json(dirs["throughput"] / THROUGHPUT_FILE) if opened("throughput") else None,
        publish=read_output_json(dirs["publish"] / RECEIPT_FILE) if opened("publish") else None,
    )


def target_entry(target: PlannedTarget, found: StageOutputs) -> dict[str, Any] | None:
    """One pipeline.reporting.report entry, or None when there is no memory plan to show."""
    build, tput, ev, cal, receipt = found.build, found.throughput, found.evaluate, found.calibrate, found.publish
    if tput is not None:
        memory = {"weights_bytes": tput["predicted_weights_bytes"], "kv_capacity_tokens": tput["predicted_kv_capacity_tokens"]}
    elif build is not None:
        memory = {"weights_bytes": build["weights_bytes"], "kv_capacity_tokens": build["kv_capacity_tokens"]}
    else:
        return None
    recipe = load_recipe(target.recipe_path)
    measured = bool(tput and tput.get("measured_output_tok_s"))
    prefix = "measured_" if measured else "predicted_"
    # Without a throughput output, the build's plan has the same TDP-based predictions, unprefixed.
    energy = tput or {f"predicted_{k}": build.get(k) for k in ("joules_per_token", "usd_per_mtok")}
    return {
        "model": target.model,
        "format": recipe.spec.quant.format,
        "variant": recipe.path.stem,
        "gpu": target.gpu,
        "tp": recipe.spec.targets[target.gpu].tp,
        "gate": ev["gate"] if ev else None,
        "memory": memory,
        "throughput": throughput_entry(tput, build),
        "joules_per_token": energy.get(f"{prefix}joules_per_token"),
        "power_source": energy.get(f"{prefix}power_source") or ("tdp" if energy.get("predicted_joules_per_token") else None),
        "usd_per_mtok": energy.get(f"{prefix}usd_per_mtok"),
        "eval_path": ev["path"] if ev else None,
        "disagreement": {task: a["disagreement"] for task, a in ev["agreement"].items()} if ev else None,
        "perplexity": {"baseline": cal["perplexity_baseline"], "quantized": cal["perplexity_quantized"]} if cal else None,
        "publish": ({"published": receipt["published"], "version": receipt.get("version"), "reason": receipt.get("reason"),
                     "gated_on": receipt.get("gated_on")} if receipt else None),
    }


def read_served(served_dir: Path) -> dict[str, Any] | None:
    """The serve-eval stage's output (pipeline/stages/evaluate.py): the bundle scored through a real
    engine (engine, version, device, start time and decode rate from its manifest, the gate from
    its gate report), or why no engine here ran it. None when the stage has not run."""
    if not (served_dir / MANIFEST_NAME).is_file():
        return None
    details = open_upstream(served_dir, "evaluate", verify=False).details
    served = None if isinstance(details, NotServedDetails) else details.served
    if not served:
        return {"served": False, "reason": getattr(details, "reason", None)}
    metrics = read_output_json(served_dir / "metrics.json") or {}
    as_served = metrics.get("simulated_as_served") or {}
    return {"served": True, "engine": served["engine"], "engine_version": served.get("engine_version"),
            "device": served.get("device"),
            "gate": read_output_json(served_dir / GATE_REPORT_FILE),
            "simulated_as_served": as_served.get("metrics"),
            "simulated_as_served_kv": _kv_label(as_served.get("kv_cache")) if as_served else None,
            "simulated_kv": _kv_label(simulated_kv_cache(served_dir)),
            "kv_not_served": served.get("kv_not_served")}


def simulated_kv_cache(served_dir: Path) -> dict[str, Any] | None:
    """The evaluate stage's KV numerics for the served target's recipe (data/eval/<recipe>, beside
    data/eval/<recipe>-<gpu>-served; the served manifest's subject is the recipe id)."""
    recipe_id = open_upstream(served_dir, "evaluate", verify=False).envelope.subject
    evaluate_metrics = served_dir.parent / str(recipe_id) / "metrics.json"
    if not recipe_id or not evaluate_metrics.is_file():
        return None
    return ((read_output_json(evaluate_metrics).get("simulation") or {}).get("kv_cache"))


def _kv_label(kv_cache: dict[str, Any] | None) -> str | None:
    if not kv_cache:
        return None
    of = kv_cache.get("numerics_of") or {}
    engine = " ".join(str(x) for x in (of.get("engine"), of.get("engine_version")) if x)
    return f"{kv_cache.get('numerics')}" + (f" ({engine})" if engine else "")


def throughput_entry(tput: dict[str, Any] | None, plan: dict[str, Any] | None) -> dict[str, Any] | None:
    # Output tok/s measured by trtllm-bench, else the throughput model's predicted run (the throughput
    # stage's, else the build's plan). Never the roofline: that is a ceiling, not a prediction.
    if tput and tput.get("measured_output_tok_s"):
        return {"output_tok_s": tput["measured_output_tok_s"], "source": "measured",
                "predicted_tok_s": tput.get("predicted_output_tok_s"),
                "measured_over_predicted": tput.get("measured_over_predicted")}
    for source in (tput, plan):
        value = source and source.get("predicted_output_tok_s")
        if value is not None and source:
            return {"output_tok_s": value, "source": "predicted"}
    return None


def frontier_section(targets: list[PlannedTarget], data_dir: Path, out_dir: Path) -> str | None:
    """Effective bits vs recovery of every variant tried (pipeline/reporting/frontier.py), one section
    per model with two or more calibrated recipes. Reads each recipe's calibrate manifest, its gate
    report and, where published, the receipt's version."""
    by_model: dict[str, dict[str, Variant]] = {}
    thresholds: dict[str, float] = {}
    for t in targets:
        cal_dir, eval_dir = data_dir / "quantized" / t.recipe_id, data_dir / "eval" / t.recipe_id
        if not (cal_dir / MANIFEST_NAME).is_file():
            continue
        details = open_upstream(cal_dir, "calibrate", verify=False).details
        gate = read_output_json(eval_dir / GATE_REPORT_FILE) if (eval_dir / MANIFEST_NAME).is_file() else None
        receipt = read_output_json(data_dir / "published" / t.key / RECEIPT_FILE)
        recipe = load_recipe(t.recipe_path)
        variant = variant_from_outputs(recipe.variant, recipe.spec.quant.format, details, gate,
                                       receipt.get("version") if receipt and receipt.get("published") else None)
        if variant is not None:
            by_model.setdefault(t.model, {})[variant.name] = variant
            if recipe.spec.quant.format == "nvfp4" and recipe.variant == "nvfp4":
                thresholds[t.model] = recipe.spec.eval.gates.default_min_recovery
    sections = []
    for model, variants in by_model.items():
        if len(variants) < 2:
            continue
        names = list(dict.fromkeys(m for v in variants.values() for m in v.metrics))
        png = plot(list(variants.values()), names, thresholds.get(model), out_dir / "figures" / f"frontier_{model}.png")
        body = markdown(list(variants.values()), names, thresholds.get(model), None, f"figures/{png.name}")
        sections.append(body.replace("## Effective bits vs recovery (frontier)", f"## {model}: effective bits vs recovery", 1))
    return "\n".join(sections) if sections else None
