"""Issue 26 item 11: a stage run twice on the same inputs writes byte-identical outputs, so DVC's
run-cache, a shared remote and `dvc status` see the same digests (dvc.lock unchanged). What a run
cost goes to its timings metrics file (`--timings`, pipeline/handoff/kpis.py), never into an output.

The real stages through the `forge` CLI on the tiny Llama (CPU, seconds each): download, calibration
set, calibrate (ModelOpt FP8), build, throughput (predicted: no GPU here), baseline and evaluate
(lm-eval, 4 documents per task), publish (a directory registry; the rerun finds the version there).
Not proven here: serve-baseline / serve-eval (a live engine's scores, decode rate and log) and a
measured throughput run (trtllm-bench on the target GPU): measurements, different on every run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.core.errors import StageInputError
from pipeline.handoff.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/tiny-llama/fp8.yaml"
KEY, TARGET = "tiny-llama-fp8", "tiny-llama-fp8-h200"


def _stages() -> list[list[str]]:
    """dvc.yaml's commands for the tiny model, each with its `--timings` file."""
    limit = ["--eval-dir", "eval", "--limit", "4"]
    return [
        ["download", "recipes/tiny-llama/model.yaml", "--out", "data/models/tiny-llama",
         "--timings", "metrics/run/download/tiny-llama.json"],
        ["calibration-set", RECIPE, "--model", "data/models/tiny-llama", "--out", f"data/calibration/{KEY}",
         "--timings", f"metrics/run/calibration-set/{KEY}.json"],
        ["calibrate", RECIPE, "--model", "data/models/tiny-llama", "--calibration", f"data/calibration/{KEY}",
         "--out", f"data/quantized/{KEY}", "--metrics", f"metrics/calibrate/{KEY}.json",
         "--timings", f"metrics/run/calibrate/{KEY}.json"],
        ["build", RECIPE, "--gpu", "h200", "--quantized", f"data/quantized/{KEY}", "--out", f"data/bundles/{TARGET}",
         "--metrics", f"metrics/build/{TARGET}.json", "--timings", f"metrics/run/build/{TARGET}.json"],
        ["throughput", RECIPE, "--gpu", "h200", "--bundle", f"data/bundles/{TARGET}", "--out",
         f"data/throughput/{TARGET}", "--metrics", f"metrics/throughput/{TARGET}.json"],
        ["baseline", "recipes/tiny-llama/model.yaml", "--model", "data/models/tiny-llama",
         "--out", "data/eval/tiny-llama-baseline", *limit, "--timings", "metrics/run/baseline/tiny-llama.json"],
        ["evaluate", RECIPE, "--model", "data/models/tiny-llama", "--quantized", f"data/quantized/{KEY}",
         "--baseline", "data/eval/tiny-llama-baseline", "--out", f"data/eval/{KEY}",
         "--metrics", f"metrics/evaluate/{KEY}.json", *limit, "--timings", f"metrics/run/evaluate/{KEY}.json"],
        ["publish", RECIPE, "--gpu", "h200", "--bundle", f"data/bundles/{TARGET}", "--evaluation", f"data/eval/{KEY}",
         "--registry", "registry", "--out", f"data/published/{TARGET}", "--timings", f"metrics/run/publish/{TARGET}.json"],
    ]


def _outputs(root: Path) -> dict[str, bytes]:
    """Every file the stages wrote as outputs (data/, metrics/ but not the timings)."""
    files = [p for top in ("data", "metrics") for p in sorted((root / top).rglob("*")) if p.is_file()]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files
            if not p.relative_to(root).as_posix().startswith("metrics/run/")}


@pytest.fixture(scope="module")
def two_runs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    for name in ("calibration", "eval"):
        (root / name).symlink_to(ROOT / name)
    model_dir = root / "recipes" / "tiny-llama"
    model_dir.mkdir(parents=True)
    shutil.copy(tiny_llama.model_dir / "config.json", model_dir / "config.json")
    (model_dir / "model.yaml").write_text(yaml.safe_dump({
        "source": {"kind": "local", "path": str(tiny_llama.model_dir)}, "eval": {"suite": "smoke"}}))
    (model_dir / "fp8.yaml").write_text(yaml.safe_dump({
        "quant": {"format": "fp8", "kv_cache_dtype": "fp8"},
        "calibration": {"set": "generated-en", "num_samples": 4, "seq_len": 32},
        "targets": {"h200": {"max_input_len": 256, "max_output_len": 256, "concurrency": 8,
                             "price_per_gpu_hour_usd": 3.5}},
        "eval": {"suite": "smoke", "gates": {"default_min_recovery": 0.5}}}))
    cwd = os.getcwd()
    os.chdir(root)
    runs = []
    try:
        for _ in range(2):  # the second run: outputs removed, as `dvc repro --force` re-runs a stage
            shutil.rmtree(root / "data", ignore_errors=True)
            shutil.rmtree(root / "metrics", ignore_errors=True)
            for argv in _stages():
                assert main(argv) == 0, argv
            runs.append((_outputs(root), {p.relative_to(root).as_posix(): json.loads(p.read_text())
                                          for p in sorted((root / "metrics/run").rglob("*.json"))}))
        yield root, runs
    finally:
        os.chdir(cwd)


def test_every_stage_output_is_byte_identical_on_a_rerun(two_runs):
    _, ((first, _), (second, _)) = two_runs
    assert sorted(first) == sorted(second)
    differ = sorted(name for name in first if first[name] != second[name])
    assert differ == [], f"differ between two runs of the same inputs: {differ}"
    stages = {json.loads(first[name])["stage"] for name in first if name.endswith("/manifest.json")}
    assert stages == {"download", "calibration-set", "calibrate", "build", "throughput", "baseline", "evaluate",
                      "publish"}
    # the metrics the stages declare are outputs too, and hold no duration
    assert json.loads(first[f"metrics/calibrate/{KEY}.json"]).keys() == {"perplexity_change_pct", "checkpoint_bytes",
                                                                         "effective_bits"}
    assert {"predicted_tok_s", "usd_per_mtok"} <= json.loads(first[f"metrics/throughput/{TARGET}.json"]).keys()


def test_manifests_hold_no_wall_clock_field_and_timings_go_to_metrics(two_runs):
    _, ((outputs, timings), (_, again)) = two_runs
    manifest = json.loads(outputs[f"data/quantized/{KEY}/manifest.json"])
    assert manifest["schema"] == "forge.manifest/2"
    assert not {"created", "timings"} & set(manifest)
    assert not {"calibrate_seconds", "stage_seconds", "quantize_seconds", "peak_rss_bytes"} & set(
        manifest["details"]["results"])
    assert "seconds" not in json.loads(outputs[f"data/eval/{KEY}/metrics.json"])
    assert "created" not in json.loads(outputs[f"data/published/{TARGET}/receipt.json"])
    # each stage's cost, in its timings file (dvc.yaml: top-level `metrics: metrics`, git-ignored metrics/run/)
    assert set(timings) == {"metrics/run/download/tiny-llama.json", f"metrics/run/calibration-set/{KEY}.json",
                            f"metrics/run/calibrate/{KEY}.json", f"metrics/run/build/{TARGET}.json",
                            "metrics/run/baseline/tiny-llama.json", f"metrics/run/evaluate/{KEY}.json",
                            f"metrics/run/publish/{TARGET}.json"}
    calibrate = timings[f"metrics/run/calibrate/{KEY}.json"]
    assert calibrate["calibrate_s"] > 0 and calibrate["quantize_s"] >= calibrate["calibrate_s"]
    assert calibrate["peak_cpu_rss_bytes"] > 0 and calibrate["total_s"] >= calibrate["calibrate_s"]
    assert timings["metrics/run/baseline/tiny-llama.json"]["evaluate_s"] > 0
    assert set(again) == set(timings)


def test_an_old_manifest_is_refused_with_what_to_do(two_runs):
    root, _ = two_runs
    old = root / "old-bundle"
    shutil.copytree(root / "data" / "bundles" / TARGET, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.update(schema="forge.manifest/1", created="2026-12-01T10:00:00+00:00", timings={"load_test": 0.0})
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageInputError) as info:
        read_manifest(old, "build")
    assert str(info.value) == (
        f"{old / 'manifest.json'}: schema: is 'forge.manifest/1', written by an older forge whose manifests held "
        "wall-clock fields (`created`, `timings`) that changed the output's digest on every run; this forge reads "
        "'forge.manifest/2'. Fix: re-run the build stage with this forge: `dvc repro` re-runs it (every stage in "
        "dvc.yaml depends on pipeline/handoff/manifest.py); for an output that came from elsewhere (a DVC remote, "
        "a copy), `dvc repro --force <stage>`.")


def test_every_manifest_writing_stage_depends_on_the_manifest_writer():
    """So a change of the envelope (as /1 -> /2) re-runs every stage that writes one, as the fix above says."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    writers = [name for name, s in stages.items() if "forge " in (s.get("do") or s)["cmd"]
               and not name.startswith(("report", "gpu-compare"))]
    assert len(writers) == 11
    for name in writers:
        assert "pipeline/handoff/manifest.py" in (stages[name].get("do") or stages[name])["deps"], name
