"""The stages end to end through the `forge` CLI on a tiny random Llama (CPU, seconds): download
from a local directory, calibration set, real ModelOpt calibration + export for FP8 and NVFP4,
build. And the ways upstream inputs can be wrong, each a clear error that leaves no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
FORMAT_TARGETS = (("fp8", "h200"), ("nvfp4", "b200"), ("w4a8_mxfp4_fp8", "b200"))


def _variant(fmt: str) -> str:
    return fmt.replace("_", "-")  # recipe file names are artifact names: no underscores


@pytest.fixture(scope="module")
def workspace(tiny_llama, tmp_path_factory):
    """A repo-shaped directory: recipes/tiny-llama/{model.yaml, config.json, fp8.yaml, nvfp4.yaml}."""
    root = tmp_path_factory.mktemp("forge")
    for name in ("calibration", "eval"):
        (root / name).symlink_to(ROOT / name)
    (root / "recipes").mkdir()
    model_dir = root / "recipes/tiny-llama"
    model_dir.mkdir()
    shutil.copy(tiny_llama.model_dir / "config.json", model_dir / "config.json")
    (model_dir / "model.yaml").write_text(yaml.safe_dump({
        "source": {"kind": "local", "path": str(tiny_llama.model_dir)}, "eval": {"suite": "smoke"},
    }))
    for fmt, gpu in FORMAT_TARGETS:
        (model_dir / f"{_variant(fmt)}.yaml").write_text(yaml.safe_dump({
            "quant": {"format": fmt, "kv_cache_dtype": "fp8"},
            "calibration": {"set": "generated-en", "num_samples": 4, "seq_len": 32},
            "targets": {gpu: {"max_input_len": 256, "max_output_len": 256, "concurrency": 8}},
            "eval": {"suite": "smoke"},
        }))
    return root


def forge(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture(scope="module")
def pipeline_outputs(workspace):
    import os

    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        assert forge("download", "recipes/tiny-llama/model.yaml", "--out", "data/models/tiny-llama") == 0
        for fmt, gpu in FORMAT_TARGETS:
            v = _variant(fmt)
            recipe = f"recipes/tiny-llama/{v}.yaml"
            assert forge("calibration-set", recipe, "--model", "data/models/tiny-llama",
                         "--out", f"data/calibration/tiny-llama-{v}") == 0
            assert forge("calibrate", recipe, "--model", "data/models/tiny-llama", "--calibration",
                         f"data/calibration/tiny-llama-{v}", "--out", f"data/quantized/tiny-llama-{v}",
                         "--metrics", f"metrics/calibrate/tiny-llama-{v}.json") == 0
            assert forge("build", recipe, "--gpu", gpu, "--quantized", f"data/quantized/tiny-llama-{v}",
                         "--out", f"data/bundles/tiny-llama-{v}-{gpu}",
                         "--metrics", f"metrics/build/tiny-llama-{v}-{gpu}.json") == 0
        yield workspace
    finally:
        os.chdir(cwd)


def test_download_writes_checkpoint_and_manifest(pipeline_outputs):
    out = pipeline_outputs / "data/models/tiny-llama"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "download" and manifest["details"]["source"]["kind"] == "local"
    assert "checkpoint/model.safetensors" in manifest["files"]
    assert isinstance(manifest["details"]["smoke_completion"], str)


@pytest.mark.parametrize("fmt,quant_algo", [("fp8", "FP8"), ("nvfp4", "NVFP4"), ("w4a8_mxfp4_fp8", "W4A8_MXFP4_FP8")])
def test_calibrate_exports_a_verified_unified_checkpoint(pipeline_outputs, fmt, quant_algo):
    out = pipeline_outputs / f"data/quantized/tiny-llama-{_variant(fmt)}"
    quant_config = json.loads((out / "checkpoint/hf_quant_config.json").read_text())["quantization"]
    assert quant_config["quant_algo"] == quant_algo
    assert quant_config["kv_cache_quant_algo"] == "FP8"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["stage"] == "download"
    assert manifest["details"]["export"]["quantized_layers"] == 2 * 7  # q,k,v,o,gate,up,down x 2 layers
    assert (out / "quant_state.pt").is_file() and (out / "checkpoint/tokenizer.json").is_file()
    results = manifest["details"]["results"]
    assert results["perplexity_quantized"] != results["perplexity_baseline"]
    assert results["path"] == {"fp8": "modelopt-fake-quant-cpu"}.get(fmt, "forge-fp4-reference-cpu")
    # The DVC metrics file holds only the calibrate KPIs, all numbers (pipeline/handoff/kpis.py).
    metrics = json.loads((pipeline_outputs / f"metrics/calibrate/tiny-llama-{_variant(fmt)}.json").read_text())
    assert sorted(metrics) == ["checkpoint_bytes", "effective_bits", "perplexity_change_pct"]
    assert 4 < results["effective_bits"] < 9 and results["whole_checkpoint_bits"] > results["effective_bits"] - 1
    assert metrics["perplexity_change_pct"] == round(results["perplexity_delta_pct"], 6)
    # Only the engines whose contract loads the bundle (pipeline/engines/contracts.py) appear with a command.
    gpu = dict(FORMAT_TARGETS)[fmt]
    bundle = json.loads((pipeline_outputs / f"data/bundles/tiny-llama-{_variant(fmt)}-{gpu}/manifest.json").read_text())
    loads = [r["engine"] for r in bundle["details"]["compatibility"] if r["loads"]]
    assert loads == {"fp8": ["tensorrt-llm", "vllm", "vllm-cpu", "sglang"], "nvfp4": ["tensorrt-llm", "vllm", "sglang"],
                     "w4a8_mxfp4_fp8": ["tensorrt-llm"]}[fmt]


def test_build_bundle_agrees_with_plan(pipeline_outputs, capsys):
    import os

    bundle = pipeline_outputs / "data/bundles/tiny-llama-fp8-h200"
    options = yaml.safe_load((bundle / "llm_api_options.yaml").read_text())
    cwd = os.getcwd()
    os.chdir(pipeline_outputs)
    try:
        capsys.readouterr()
        assert forge("plan", "recipes/tiny-llama/fp8.yaml", "--json") == 0
        plan = json.loads(capsys.readouterr().out)
    finally:
        os.chdir(cwd)
    assert options["kv_cache_config"]["max_tokens"] == plan["kv_capacity_tokens"]
    assert options["max_batch_size"] == plan["decode_batch"] == 8
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["details"]["load_tested"] is False
    # The checkpoint is hard-linked from the calibrate output, not copied.
    src = pipeline_outputs / "data/quantized/tiny-llama-fp8/checkpoint/model.safetensors"
    assert (bundle / "checkpoint/model.safetensors").stat().st_ino == src.stat().st_ino


def _no_partial(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.glob(f".{name}*")] if parent.exists() else True


def test_too_few_calibration_samples_is_refused_without_output(pipeline_outputs, capsys, monkeypatch):
    monkeypatch.chdir(pipeline_outputs)
    recipe = Path("recipes/tiny-llama/big.yaml")
    data = yaml.safe_load(Path("recipes/tiny-llama/fp8.yaml").read_text())
    data["calibration"].update(num_samples=100_000, seq_len=4096)
    recipe.write_text(yaml.safe_dump(data))
    try:
        code = forge("calibration-set", str(recipe), "--model", "data/models/tiny-llama", "--out", "data/calibration/big")
    finally:
        recipe.unlink()
    err = capsys.readouterr().err
    assert code == 2 and "Fix:" in err and "Traceback" not in err
    _no_partial(Path("data/calibration"), "big")


def test_calibrate_refuses_missing_model_files(pipeline_outputs, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(pipeline_outputs)
    broken = tmp_path / "model"
    shutil.copytree("data/models/tiny-llama", broken)
    (broken / "checkpoint/model.safetensors").unlink()
    code = forge("calibrate", "recipes/tiny-llama/fp8.yaml", "--model", str(broken), "--calibration",
                 "data/calibration/tiny-llama-fp8", "--out", str(tmp_path / "q"), "--metrics", str(tmp_path / "m.json"))
    err = capsys.readouterr().err
    assert code == 2
    assert "checkpoint/model.safetensors: listed in the manifest but missing. Fix: re-run the stage." in err
    _no_partial(tmp_path, "q")


def test_calibrate_refuses_a_calibration_set_made_for_other_settings(pipeline_outputs, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(pipeline_outputs)
    code = forge("calibrate", "recipes/tiny-llama/nvfp4.yaml", "--model", "data/models/tiny-llama", "--calibration",
                 "data/calibration/tiny-llama-fp8", "--out", str(tmp_path / "q"), "--metrics", str(tmp_path / "m.json"))
    assert code == 0, capsys.readouterr().err  # same calibration section, other format: accepted
    recipe = Path("recipes/tiny-llama/other.yaml")
    data = yaml.safe_load(Path("recipes/tiny-llama/fp8.yaml").read_text())
    data["calibration"]["seed"] = 7
    recipe.write_text(yaml.safe_dump(data))
    try:
        code = forge("calibrate", str(recipe), "--model", "data/models/tiny-llama", "--calibration",
                     "data/calibration/tiny-llama-fp8", "--out", str(tmp_path / "q2"), "--metrics", str(tmp_path / "m2.json"))
    finally:
        recipe.unlink()
    err = capsys.readouterr().err
    assert code == 2 and "was made from another `calibration` section of" in err
    _no_partial(tmp_path, "q2")


def test_download_refuses_architecture_drift(pipeline_outputs, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(pipeline_outputs)
    drift = Path("recipes/tiny-drift")
    shutil.copytree("recipes/tiny-llama", drift)
    config = json.loads((drift / "config.json").read_text())
    config["hidden_size"] = 96
    (drift / "config.json").write_text(json.dumps(config))
    try:
        code = forge("download", str(drift / "model.yaml"), "--out", str(tmp_path / "m"))
    finally:
        shutil.rmtree(drift)
    err = capsys.readouterr().err
    assert code == 2
    assert "differs from the downloaded model's config.json: hidden_size 96 vs 64 (planned vs downloaded)" in err
    _no_partial(tmp_path, "m")
