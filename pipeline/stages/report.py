"""Stage `report`: one comparison across every planned target, from the stages' DVC metrics.

In: plan.yaml (the targets `dvc repro` built) and the metrics directory: calibrate/<recipe>.json,
evaluate/<recipe>.json, build/<target>.json, throughput/<target>.json. Out (`--out`): report.md,
figures/*.png and plots/*.csv (pipeline/report.py). A planned target whose metrics are absent is
listed under "Missing results" with the file that is missing, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import StageInputError
from pipeline.recipe import load_recipe

log = logging.getLogger(__name__)

EXAMPLE = """example:
  forge report --plan plan.yaml --metrics metrics --out reports
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="comparison report across recipes and GPUs (Markdown + PNG + DVC plot tables)",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, required=True, help="plan.yaml (forge plan --dvc)")
    p.add_argument("--metrics", type=Path, required=True, help="the metrics directory the stages write")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="forge comparison report")
    p.add_argument("--gpu-compare", type=Path, help="the gpu-compare stage's output directory, to include as a section")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return main(args.plan, args.metrics, args.out, args.title, args.gpu_compare)


def main(plan_path: Path, metrics_dir: Path, out_dir: Path, title: str = "forge comparison report",
         gpu_compare_dir: Path | None = None) -> int:
    from pipeline.report import gpu_comparison_section, write_report

    targets = read_plan_targets(Path(plan_path))
    collected = collect(targets, Path(metrics_dir))
    sections = [gpu_comparison_section(Path(gpu_compare_dir), Path(out_dir))] if gpu_compare_dir else []
    files = write_report(collected.entries, Path(out_dir), title, collected.missing, sections)
    for line in collected.missing:
        log.warning("report: %s", line)
    log.info("report: %s, %d figures, %d of %d targets complete", files.markdown, len(files.plots),
             len(targets) - len({m.split(":")[0] for m in collected.missing}), len(targets))
    return 0


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class PlannedTarget:
    key: str  # artifact name, e.g. smollm2-135m-instruct-fp8-h200
    recipe_path: Path
    recipe_id: str
    model: str
    gpu: str


def read_plan_targets(plan_path: Path) -> list[PlannedTarget]:
    try:
        plan = yaml.safe_load(plan_path.read_text())
    except OSError as exc:
        raise StageInputError(str(plan_path), f"cannot read the plan ({exc.strerror}).", "run `make plan` (forge plan --dvc).") from None
    targets = (plan or {}).get("targets") if isinstance(plan, dict) else None
    if not isinstance(targets, dict):
        raise StageInputError(str(plan_path), "has no `targets` mapping.", "regenerate it: forge plan --dvc.")
    try:
        return [PlannedTarget(key, Path(t["recipe"]), t["recipe_id"], t["model"], t["gpu"]) for key, t in targets.items()]
    except (KeyError, TypeError) as exc:
        raise StageInputError(f"{plan_path}: targets", f"an entry lacks {exc}.", "regenerate it: forge plan --dvc.") from None


def read_metrics(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageInputError(str(path), f"not valid JSON ({exc.msg}).", "re-run the stage that writes it.") from None
    if not isinstance(data, dict):
        raise StageInputError(str(path), "is not a JSON object.", "re-run the stage that writes it.")
    return data


@dataclass(frozen=True)
class Collected:
    entries: list[dict[str, Any]]  # pipeline.report TargetEntry mappings
    missing: list[str]  # "<target>: <what is missing and what it means>"


def collect(targets: list[PlannedTarget], metrics_dir: Path) -> Collected:
    entries: list[dict[str, Any]] = []
    missing: list[str] = []
    for target in targets:
        files = {
            "calibrate": metrics_dir / "calibrate" / f"{target.recipe_id}.json",
            "evaluate": metrics_dir / "evaluate" / f"{target.recipe_id}.json",
            "build": metrics_dir / "build" / f"{target.key}.json",
            "throughput": metrics_dir / "throughput" / f"{target.key}.json",
        }
        found = {stage: read_metrics(path) for stage, path in files.items()}
        consequence = {"calibrate": "no perplexity", "evaluate": "accuracy not gated",
                       "build": "bundle not built", "throughput": "throughput stage did not run"}
        for stage, data in found.items():
            if data is None:
                missing.append(f"{target.key}: {files[stage]} missing ({consequence[stage]})")
        try:
            entry = target_entry(target, found)
        except KeyError as exc:
            stage = next((s for s, d in found.items() if d is not None), "build")
            raise StageInputError(str(files[stage]), f"lacks the key {exc}.", "re-run the stage that writes it.") from None
        if entry is None:
            missing.append(f"{target.key}: no memory plan (neither build nor throughput metrics): target not shown")
        else:
            entries.append(entry)
    return Collected(entries, missing)


def target_entry(target: PlannedTarget, found: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """One pipeline.report entry, or None when there is no memory plan to show."""
    build, tput, ev, cal = found["build"], found["throughput"], found["evaluate"], found["calibrate"]
    sized = tput or build
    if sized is None:
        return None
    recipe = load_recipe(target.recipe_path)
    measured = bool(tput and tput.get("measured_output_tok_s"))
    prefix = "measured_" if measured else "predicted_"
    energy = tput or build
    return {
        "model": target.model,
        "format": recipe.spec.quant.format,
        "gpu": target.gpu,
        "tp": recipe.spec.targets[target.gpu].tp,
        "gate": gate_from_metrics(ev) if ev else None,
        "memory": {"weights_bytes": sized["predicted_weights_bytes"],
                   "kv_capacity_tokens": sized["predicted_kv_capacity_tokens"]},
        "throughput": throughput_from_metrics(tput, build),
        "joules_per_token": energy.get(f"{prefix}joules_per_token"),
        "power_source": energy.get(f"{prefix}power_source") or ("tdp" if energy.get("predicted_joules_per_token") else None),
        "usd_per_mtok": energy.get(f"{prefix}usd_per_mtok"),
        "eval_path": ev.get("path") if ev else None,
        "perplexity": {"baseline": cal["perplexity_baseline"], "quantized": cal["perplexity_quantized"]} if cal else None,
    }


def gate_from_metrics(ev: dict[str, Any]) -> dict[str, Any]:
    """The evaluate stage's flat metrics back into GateReport.to_dict() form."""
    fields = ("baseline", "quantized", "direction", "recovery", "threshold", "verdict", "reason")
    return {"verdict": ev["gate_verdict"],
            "rows": [{"metric": metric, **{k: row[k] for k in fields}} for metric, row in ev["gates"].items()]}


def throughput_from_metrics(tput: dict[str, Any] | None, build: dict[str, Any] | None) -> dict[str, Any] | None:
    # The throughput model's predicted run (predicted_output_tok_s) where the metrics carry one, else
    # the roofline ceiling (build metrics only).
    if tput and tput.get("measured_output_tok_s"):
        return {"decode_tok_s_max_batch": tput["measured_output_tok_s"], "source": "measured",
                "predicted_tok_s": tput.get("predicted_output_tok_s") or tput.get("predicted_decode_tok_s_max_batch"),
                "measured_over_predicted": tput.get("measured_over_predicted")}
    for source in (tput, build):
        value = source and (source.get("predicted_output_tok_s") or source.get("predicted_decode_tok_s_max_batch"))
        if value is not None and source:
            return {"decode_tok_s_max_batch": value, "source": "predicted"}
    return None
