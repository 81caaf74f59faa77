"""The report stage: stage outputs as the real stages leave them (calibrate's manifest results,
build's plan, throughput.predicted_metrics in throughput.json, evaluate's gate_report.json, publish's
receipt) collected per planned target into the comparison report and the end-of-run summary; a
planned target without outputs is reported as missing. Metrics files are never read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.accuracy.gates import GatePolicy, evaluate_gates
from pipeline.core.errors import StageInputError
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.planning.targets import plan_target
from pipeline.recipe.loading import load_recipe
from pipeline.stages import report as report_stage
from pipeline.stages import throughput
from tests.handoff_fixtures import build_details

ROOT = Path(__file__).resolve().parents[2]
CATALOG = DEFAULT_CATALOG
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


def stage_output(directory: Path, stage: str, files: dict[str, dict], details: dict | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write(directory / name, data)
    write_manifest(directory, build_manifest(stage, directory.name, directory, {}, details=details))


@pytest.fixture
def metrics_dir(tmp_path):
    """The data directory. fp8@h200 complete and published; mxfp4@b200 without throughput output,
    refused; nvfp4@b200 with nothing at all. (Named for the old layout: no metrics file is written.)"""
    catalog = load_catalog(CATALOG)
    data = tmp_path / "data"
    for variant, gpu in (("fp8", "h200"), ("mxfp4", "b200")):
        recipe = load_recipe(Path(f"recipes/smollm2-135m-instruct/{variant}.yaml"))
        plan = plan_target(recipe, gpu, catalog)
        key = recipe.artifact_name(gpu)
        stage_output(data / "quantized" / recipe.id, "calibrate", {}, {"results": {
            "perplexity_baseline": 15.30, "perplexity_quantized": 15.63 if variant == "fp8" else 56.5}})
        stage_output(data / "bundles" / key, "build", {}, build_details(plan.to_json(), model=recipe.model.name))
        gate = evaluate_gates(BASELINE, QUANTIZED[variant], DIRECTIONS, GatePolicy(0.95))
        stage_output(data / "eval" / recipe.id, "evaluate", {"gate_report.json": gate.to_dict()},
                     {"path": "simulated-cpu"})
        receipt = ({"published": True, "name": key, "registry": "registry", "version": "v1.0.0"} if variant == "fp8" else
                   {"published": False, "name": key, "registry": "registry",
                    "reason": "accuracy gate failed: forge_mc/acc,none recovery 0.5345 < 0.95"})
        stage_output(data / "published" / key, "publish", {"receipt.json": receipt}, receipt)
        if variant == "fp8":
            pricing = throughput.Pricing(3.5, "recipe")
            ceilings = throughput.ceilings_for(recipe, gpu, catalog[gpu], tmp_path / "no-probes")
            predicted = throughput.predicted_metrics(recipe, gpu, plan, ceilings, catalog[gpu], pricing)
            stage_output(data / "throughput" / key, "throughput",
                         {"throughput.json": {**predicted, "measured": None, "measured_reason": "cpu"}})
    return data


def test_report_from_stage_metrics_lists_missing_targets(metrics_dir, tmp_path):
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(json.dumps(PLAN))  # JSON is YAML
    assert report_stage.main(plan_path, metrics_dir, tmp_path / "reports") == 0
    out = tmp_path / "reports"
    md = (out / "report.md").read_text()
    catalog = load_catalog(CATALOG)
    fp8_plan = plan_target(load_recipe(Path("recipes/smollm2-135m-instruct/fp8.yaml")), "h200", catalog)
    mx_plan = plan_target(load_recipe(Path("recipes/smollm2-135m-instruct/mxfp4.yaml")), "b200", catalog)
    predicted = fp8_plan.throughput["predicted_output_tok_s"]  # the throughput model's run (pipeline/sizing/perfmodel.py)
    fp8_row = (f"| fp8 | h200 | 1 | PASS (simulated-cpu) | {0.7417 / 0.7483:.4f} | {136.2 / 133.31 - 1:+.1%} | "
               f"{fp8_plan.weights_bytes / 2**30:.2f} | {fp8_plan.kv_capacity_tokens:,} | "
               f"{predicted:,.0f} (predicted) | {700 / predicted:.4g} (tdp) | "
               f"{3.5 / (predicted * 3600) * 1e6:.4g} |")
    assert fp8_row in md
    # mxfp4 (the recipe's format is w4a8_mxfp4_fp8): no throughput output, so the build's prediction
    # is shown, labelled as such
    assert (f"| mxfp4 (w4a8_mxfp4_fp8) | b200 | 1 | FAIL (simulated-cpu) | {0.40 / 0.7483:.4f} ✗ | {480.0 / 133.31 - 1:+.1%} ✗ | "
            f"{mx_plan.weights_bytes / 2**30:.2f} | {mx_plan.kv_capacity_tokens:,} | "
            f"{mx_plan.throughput['predicted_output_tok_s']:,.0f} (predicted) |") in md
    assert "| fp8 | h200 | 15.300 | 15.630 | +2.2% |" in md
    assert "### mxfp4 (w4a8_mxfp4_fp8)@b200x1: accuracy gate failed" in md
    missing = md.split("## Missing results\n\n")[1].splitlines()
    assert missing == [
        (f"- smollm2-135m-instruct-mxfp4-b200: {metrics_dir}/throughput/smollm2-135m-instruct-mxfp4-b200 missing "
         "(throughput stage did not run)"),
        *(f"- smollm2-135m-instruct-nvfp4-b200: {metrics_dir}/{stage}/smollm2-135m-instruct-nvfp4{suffix} missing ({why})"
          for stage, suffix, why in (("quantized", "", "no perplexity"), ("eval", "", "accuracy not gated"),
                                     ("bundles", "-b200", "bundle not built"),
                                     ("throughput", "-b200", "throughput stage did not run"),
                                     ("published", "-b200", "not published yet"))),
        "- smollm2-135m-instruct-nvfp4-b200: no memory plan (neither build nor throughput output): target not shown",
    ]
    assert "| smollm2-135m-instruct | mxfp4 (w4a8_mxfp4_fp8)@b200x1 | refused | - | accuracy gate failed: forge_mc/acc,none" in md
    with (out / "plots" / "throughput.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["label"], r["throughput_source"], r["power_source"]) for r in rows] == [
        ("smollm2-135m-instruct fp8@h200x1", "predicted", "tdp"), ("smollm2-135m-instruct mxfp4 (w4a8_mxfp4_fp8)@b200x1", "predicted", "tdp")]
    with (out / "plots" / "recovery.csv").open() as fh:
        recovery = list(csv.DictReader(fh))
    assert len(recovery) == 4 and {r["eval_path"] for r in recovery} == {"simulated-cpu"}
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["recovery_smollm2-135m-instruct.png", "throughput.png"]


def test_measured_throughput_is_preferred_and_labelled(metrics_dir, tmp_path):
    key = "smollm2-135m-instruct-fp8-h200"
    path = metrics_dir / "throughput" / key / "throughput.json"
    data = json.loads(path.read_text())
    data.update(measured={"throughput": {}}, measured_output_tok_s=40_000.0, measured_over_predicted=0.31,
                measured_joules_per_token=0.011, measured_power_source="nvml", measured_usd_per_mtok=0.024)
    path.write_text(json.dumps(data))
    collected = report_stage.collect(report_stage.read_plan_targets(_plan(tmp_path)), metrics_dir)
    entry = next(e for e in collected.entries if e["format"] == "fp8")
    assert entry["throughput"] == {"output_tok_s": 40_000.0, "source": "measured",
                                   "predicted_tok_s": data["predicted_output_tok_s"],  # the model, not the ceiling
                                   "measured_over_predicted": 0.31}
    assert (entry["joules_per_token"], entry["power_source"], entry["usd_per_mtok"]) == (0.011, "nvml", 0.024)


def test_broken_output_file_is_named(metrics_dir, tmp_path):
    (metrics_dir / "eval" / "smollm2-135m-instruct-fp8" / "gate_report.json").write_text("{not json")
    with pytest.raises(StageInputError, match=r"smollm2-135m-instruct-fp8/gate_report\.json: not valid JSON"):
        report_stage.collect(report_stage.read_plan_targets(_plan(tmp_path)), metrics_dir)


def test_plan_without_targets_is_refused(tmp_path):
    (tmp_path / "plan.yaml").write_text("models: {}\n")
    with pytest.raises(StageInputError, match=r"plan.yaml: has no `targets` mapping\. Fix: regenerate it: forge plan --dvc\."):
        report_stage.read_plan_targets(tmp_path / "plan.yaml")


def test_cli_verb(metrics_dir, tmp_path):
    assert cli.main(["report", "--plan", str(_plan(tmp_path)), "--data", str(metrics_dir),
                     "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").read_text().startswith("# forge comparison report")


def _plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(PLAN))
    return path


def test_summary_says_what_was_published_and_refused_and_why(metrics_dir, tmp_path, caplog):
    """Item 19: `dvc repro` ends with the report stage, whose last lines are this summary."""
    import logging

    with caplog.at_level(logging.INFO, logger="pipeline.stages.report"):
        assert report_stage.main(_plan(tmp_path), metrics_dir, tmp_path / "reports") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.stages.report"]
    summary = lines[lines.index(next(m for m in lines if m.startswith("summary:"))):]
    assert summary[0] == "summary: 1 published, 1 refused, 0 not published yet, 7 missing outputs"
    assert summary[1].startswith("  PUBLISHED smollm2-135m-instruct fp8@h200x1 v1.0.0: gate pass, nearest its threshold: ")
    assert summary[2] == ("  REFUSED  smollm2-135m-instruct mxfp4 (w4a8_mxfp4_fp8)@b200x1: accuracy gate failed: "
                          "forge_mc/acc,none recovery 0.5345 < 0.95")
    assert len(summary) == 3 and all(len(line) <= 160 for line in summary)


def test_readme_results_block_is_generated_from_the_outputs(metrics_dir, tmp_path):
    """Item 20: the README table comes from the run; check_repro compares it with README.md."""
    from pipeline.core.host import numerics_host
    from pipeline.reporting.readme_results import BEGIN, END, block, drift, other_host, with_block

    report_stage.main(_plan(tmp_path), metrics_dir, tmp_path / "reports")
    table = (tmp_path / "reports" / "readme_results.md").read_text()
    assert table.splitlines()[:2] == [f"Computed on: {numerics_host()}", ""]
    lines = table.splitlines()[2:]
    assert lines[0] == ("| model | recipe -> GPU | held-out ppl (calibrate) | forge_mc acc recovery [95% CI] | "
                        "forge_prose word_perplexity increase [95% CI] | gate (<= +5.3%, >= 0.95) | published |")
    assert lines[2] == (f"| smollm2-135m-instruct | fp8 -> H200 | 15.30 -> 15.63 (+2.2%) | {0.7417 / 0.7483:.4f} | "
                        f"{136.2 / 133.31 - 1:+.1%} | pass | v1.0.0 |")
    assert lines[3].endswith("| fail | refused |")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nComputed on: {numerics_host()}\n\n| old | table |\n{END}\n\nafter\n")
    assert other_host(readme, tmp_path / "reports" / "readme_results.md") is None  # same host: compared
    problem = drift(readme, tmp_path / "reports" / "readme_results.md")
    assert problem.startswith(f"{readme} results block differs from {tmp_path}/reports/readme_results.md: "
                              "README '| old | table |' vs run '| model |")
    assert problem.endswith("Fix: run `make readme` and commit README.md.")
    readme.write_text(with_block(readme.read_text(), table))
    assert drift(readme, tmp_path / "reports" / "readme_results.md") is None
    assert block(readme.read_text()) == table and readme.read_text().endswith(f"{END}\n\nafter\n")
    # computed on another CPU kind (or a block that names none): not compared, and said so
    other = with_block(readme.read_text(), table.replace(numerics_host(), "Intel Xeon, torch CPU capability AVX512"))
    readme.write_text(other)
    assert other_host(readme, tmp_path / "reports" / "readme_results.md") == (
        f"{readme} results block was computed on Intel Xeon, torch CPU capability AVX512, this run on "
        f"{numerics_host()}: CPU kernels differ between them in low-order digits, so the two are not compared "
        "(`make readme` here would publish this host's)")
    readme.write_text(with_block(other, "\n".join(table.splitlines()[2:])))
    assert "computed on an unnamed host" in other_host(readme, tmp_path / "reports" / "readme_results.md")


def test_readme_without_markers_is_named(tmp_path):
    from pipeline.reporting.readme_results import block

    with pytest.raises(StageInputError, match=r"^README.md: needs exactly one results block"):
        block("# no markers\n")


def test_the_readme_has_one_results_block():
    """Its content is checked against a real run by scripts/check_repro.py (unit tests have no run)."""
    from pipeline.reporting.readme_results import block, host_of

    text = block((ROOT / "README.md").read_text())
    assert host_of(text), "the block's first line names the CPU kind it was computed on"
    lines = text.splitlines()[2:]
    first = lines[:lines.index("")] if "" in lines else lines
    assert len(first) >= 3 and all(line.startswith("|") and line.endswith("|") for line in first)
    # below it: the per-task and published tables, each after a caption line ending with ":"
    assert all(line.startswith("|") and line.endswith("|") or line.endswith(":") for line in lines if line)


def test_default_report_leaves_out_frontier_targets_and_the_frontier_report_has_all(tmp_path):
    plan = json.loads(json.dumps(PLAN))
    frontier_key = max(plan["targets"])
    plan["targets"][frontier_key]["frontier"] = True
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(plan))
    default = {t.key for t in report_stage.read_plan_targets(path, frontier=False)}
    assert default == set(plan["targets"]) - {frontier_key}
    assert {t.key for t in report_stage.read_plan_targets(path, frontier=True)} == set(plan["targets"])
