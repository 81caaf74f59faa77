"""The report stage: metrics written by the real stage functions (calibrate's keys, build.metrics,
throughput.predicted_metrics, evaluate.flat_metrics) collected per planned target into the
comparison report; a planned target without metrics is reported as missing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.errors import StageInputError
from pipeline.evaluation import SuiteResult
from pipeline.gates import GatePolicy, evaluate_gates
from pipeline.gpus import load_catalog
from pipeline.recipe import load_recipe
from pipeline.stages import build, evaluate, throughput
from pipeline.stages import report as report_stage
from pipeline.trtllm import not_run
from pipeline.validate import plan_target

ROOT = Path(__file__).resolve().parents[2]
CATALOG = Path("recipes/gpus.yaml")
DIRECTIONS = {"forge_mc/acc,none": "higher", "forge_prose/word_perplexity,none": "lower"}
BASELINE = {"forge_mc/acc,none": 0.7483, "forge_prose/word_perplexity,none": 133.31}
QUANTIZED = {"fp8": {"forge_mc/acc,none": 0.7417, "forge_prose/word_perplexity,none": 136.2},
             "mxfp4": {"forge_mc/acc,none": 0.40, "forge_prose/word_perplexity,none": 480.0}}
PLAN = {
    "models": {"smollm2-135m-instruct": {"model_yaml": "recipes/smollm2-135m-instruct/model.yaml"}},
    "targets": {
        f"smollm2-135m-instruct-{v}-{gpu}": {"gpu": gpu, "model": "smollm2-135m-instruct",
                                             "recipe": f"recipes/smollm2-135m-instruct/{v}.yaml",
                                             "recipe_id": f"smollm2-135m-instruct-{v}"}
        for v, gpu in (("fp8", "h200"), ("mxfp4", "b200"), ("nvfp4", "b200"))
    },
}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def metrics_dir(tmp_path):
    """fp8@h200 complete; mxfp4@b200 without throughput metrics; nvfp4@b200 with nothing at all."""
    catalog = load_catalog(CATALOG)
    metrics = tmp_path / "metrics"
    for variant, gpu in (("fp8", "h200"), ("mxfp4", "b200")):
        recipe = load_recipe(Path(f"recipes/smollm2-135m-instruct/{variant}.yaml"))
        plan = plan_target(recipe, gpu, catalog)
        key = recipe.artifact_name(gpu)
        write(metrics / "calibrate" / f"{recipe.id}.json",
              {"perplexity_baseline": 15.30, "perplexity_quantized": 15.63 if variant == "fp8" else 56.5})
        write(metrics / "build" / f"{key}.json", build.metrics(plan, build.LinkedTree(3, 1000, "hardlink"), not_run("cpu")))
        gate = evaluate_gates(BASELINE, QUANTIZED[variant], DIRECTIONS, GatePolicy(0.95))
        result = SuiteResult("smoke", QUANTIZED[variant], {}, {}, {}, None, 12.5, "0.4.13")
        scored = evaluate.Scored(result, "simulated-cpu", "cpu", "float32", None)
        write(metrics / "evaluate" / f"{recipe.id}.json", evaluate.flat_metrics(recipe, scored, gate, 20.0))
        if variant == "fp8":
            pricing = throughput.Pricing(3.5, "recipe")
            ceilings = throughput.ceilings_for(recipe, gpu, catalog[gpu], tmp_path / "no-probes")
            predicted = throughput.predicted_metrics(recipe, gpu, plan, ceilings, catalog[gpu], pricing)
            write(metrics / "throughput" / f"{key}.json", {**predicted, "measured": None, "measured_reason": "cpu"})
    return metrics


def test_report_from_stage_metrics_lists_missing_targets(metrics_dir, tmp_path):
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(json.dumps(PLAN))  # JSON is YAML
    assert report_stage.main(plan_path, metrics_dir, tmp_path / "reports") == 0
    out = tmp_path / "reports"
    md = (out / "report.md").read_text()
    catalog = load_catalog(CATALOG)
    fp8_plan = plan_target(load_recipe(Path("recipes/smollm2-135m-instruct/fp8.yaml")), "h200", catalog)
    mx_plan = plan_target(load_recipe(Path("recipes/smollm2-135m-instruct/mxfp4.yaml")), "b200", catalog)
    fp8_row = (f"| fp8 | h200 | 1 | PASS (simulated-cpu) | {0.7417 / 0.7483:.4f} | {133.31 / 136.2:.4f} | "
               f"{fp8_plan.weights_bytes / 2**30:.2f} | {fp8_plan.kv_capacity_tokens:,} | "
               f"{fp8_plan.decode_tok_s_max_batch:,.0f} (predicted) | {700 / fp8_plan.decode_tok_s_max_batch:.4g} (tdp) | "
               f"{3.5 / (fp8_plan.decode_tok_s_max_batch * 3600) * 1e6:.4g} |")
    assert fp8_row in md
    # mxfp4: no throughput metrics, so the build's prediction is shown, labelled as such
    assert (f"| w4a8_mxfp4_fp8 | b200 | 1 | FAIL (simulated-cpu) | {0.40 / 0.7483:.4f} ✗ | {133.31 / 480.0:.4f} ✗ | "
            f"{mx_plan.weights_bytes / 2**30:.2f} | {mx_plan.kv_capacity_tokens:,} | "
            f"{mx_plan.decode_tok_s_max_batch:,.0f} (predicted) |") in md
    assert "| fp8 | h200 | 15.300 | 15.630 | +2.2% |" in md
    assert "### w4a8_mxfp4_fp8@b200x1: accuracy gate failed" in md
    missing = md.split("## Missing results\n\n")[1].splitlines()
    assert missing == [
        (f"- smollm2-135m-instruct-mxfp4-b200: {metrics_dir}/throughput/smollm2-135m-instruct-mxfp4-b200.json missing "
         "(throughput stage did not run)"),
        *(f"- smollm2-135m-instruct-nvfp4-b200: {metrics_dir}/{stage}/smollm2-135m-instruct-nvfp4{suffix}.json missing ({why})"
          for stage, suffix, why in (("calibrate", "", "no perplexity"), ("evaluate", "", "accuracy not gated"),
                                     ("build", "-b200", "bundle not built"),
                                     ("throughput", "-b200", "throughput stage did not run"))),
        "- smollm2-135m-instruct-nvfp4-b200: no memory plan (neither build nor throughput metrics): target not shown",
    ]
    with (out / "plots" / "throughput.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["label"], r["throughput_source"], r["power_source"]) for r in rows] == [
        ("smollm2-135m-instruct fp8@h200x1", "predicted", "tdp"), ("smollm2-135m-instruct w4a8_mxfp4_fp8@b200x1", "predicted", "tdp")]
    with (out / "plots" / "recovery.csv").open() as fh:
        recovery = list(csv.DictReader(fh))
    assert len(recovery) == 4 and {r["eval_path"] for r in recovery} == {"simulated-cpu"}
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["recovery_smollm2-135m-instruct.png", "throughput.png"]


def test_measured_throughput_is_preferred_and_labelled(metrics_dir, tmp_path):
    key = "smollm2-135m-instruct-fp8-h200"
    path = metrics_dir / "throughput" / f"{key}.json"
    data = json.loads(path.read_text())
    data.update(measured={"throughput": {}}, measured_output_tok_s=40_000.0, measured_over_predicted=0.31,
                measured_joules_per_token=0.011, measured_power_source="nvml", measured_usd_per_mtok=0.024)
    path.write_text(json.dumps(data))
    collected = report_stage.collect(report_stage.read_plan_targets(_plan(tmp_path)), metrics_dir)
    entry = next(e for e in collected.entries if e["format"] == "fp8")
    assert entry["throughput"] == {"decode_tok_s_max_batch": 40_000.0, "source": "measured",
                                   "predicted_tok_s": data["predicted_decode_tok_s_max_batch"],
                                   "measured_over_predicted": 0.31}
    assert (entry["joules_per_token"], entry["power_source"], entry["usd_per_mtok"]) == (0.011, "nvml", 0.024)


def test_broken_metrics_file_is_named(metrics_dir, tmp_path):
    (metrics_dir / "evaluate" / "smollm2-135m-instruct-fp8.json").write_text("{not json")
    with pytest.raises(StageInputError, match=r"smollm2-135m-instruct-fp8\.json: not valid JSON"):
        report_stage.collect(report_stage.read_plan_targets(_plan(tmp_path)), metrics_dir)


def test_plan_without_targets_is_refused(tmp_path):
    (tmp_path / "plan.yaml").write_text("models: {}\n")
    with pytest.raises(StageInputError, match=r"plan.yaml: has no `targets` mapping\. Fix: regenerate it: forge plan --dvc\."):
        report_stage.read_plan_targets(tmp_path / "plan.yaml")


def test_cli_verb(metrics_dir, tmp_path):
    assert cli.main(["report", "--plan", str(_plan(tmp_path)), "--metrics", str(metrics_dir),
                     "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").read_text().startswith("# forge comparison report")


def _plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(PLAN))
    return path
