"""calibrate -> build of a mixed-precision recipe (quant.auto, quant.overrides) on the tiny Llama, CPU:
the stage records effective bits and the chosen formats, the export is MIXED_PRECISION, and the
bundle's compatibility table has TensorRT-LLM loading it on B200 and vLLM refusing it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("modelopt.torch.quantization")

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUANTS = {
    "nvfp4-auto": {"format": "nvfp4", "auto": {"effective_bits": 6.0, "formats": ["nvfp4", "fp8"], "score_batches": 2}},
    "nvfp4-edges": {"format": "nvfp4", "overrides": {"*layers.0.*": "fp8"}},
}


@pytest.fixture(scope="module")
def outputs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("forge-mixed")
    for name in ("calibration", "eval"):
        (root / name).symlink_to(ROOT / name)
    model_dir = root / "recipes/tiny-llama"
    model_dir.mkdir(parents=True)
    shutil.copy(tiny_llama.model_dir / "config.json", model_dir / "config.json")
    (model_dir / "model.yaml").write_text(yaml.safe_dump({
        "source": {"kind": "local", "path": str(tiny_llama.model_dir)}, "eval": {"suite": "smoke"}}))
    for variant, quant in QUANTS.items():
        (model_dir / f"{variant}.yaml").write_text(yaml.safe_dump({
            "quant": {**quant, "kv_cache_dtype": "fp8"},
            "calibration": {"set": "generated-en", "num_samples": 4, "seq_len": 32},
            "targets": {"b200": {"max_input_len": 256, "max_output_len": 256, "concurrency": 8}},
            "eval": {"suite": "smoke"}}))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["download", "recipes/tiny-llama/model.yaml", "--out", "data/models/tiny-llama"]) == 0
        for v in QUANTS:
            recipe = f"recipes/tiny-llama/{v}.yaml"
            assert main(["calibration-set", recipe, "--model", "data/models/tiny-llama",
                         "--out", f"data/calibration/tiny-llama-{v}"]) == 0
            assert main(["calibrate", recipe, "--model", "data/models/tiny-llama", "--calibration",
                         f"data/calibration/tiny-llama-{v}", "--out", f"data/quantized/tiny-llama-{v}",
                         "--metrics", f"metrics/calibrate/tiny-llama-{v}.json",
                         "--timings", f"metrics/run/calibrate/tiny-llama-{v}.json"]) == 0
            assert main(["build", recipe, "--gpu", "b200", "--quantized", f"data/quantized/tiny-llama-{v}",
                         "--out", f"data/bundles/tiny-llama-{v}-b200", "--metrics", f"metrics/build/tiny-llama-{v}-b200.json"]) == 0
        yield root
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("variant", list(QUANTS))
def test_mixed_recipe_calibrates_and_builds_for_tensorrt_llm_only(outputs, variant):
    details = json.loads((outputs / f"data/quantized/tiny-llama-{variant}/manifest.json").read_text())["details"]
    assert details["export"]["quant_algo"] == "MIXED_PRECISION"
    assert {"fp8", "nvfp4"} <= set(details["layer_formats"])
    results = details["results"]
    assert 4.5 < results["effective_bits"] < 8 and results["effective_bits"] == details["bits"]["effective_bits"]
    if variant == "nvfp4-auto":
        assert details["auto"]["target_bits"] == 6.0 and results["effective_bits"] <= 6.0
        # the search's cost is a timing of the run, not part of the output (pipeline/handoff/kpis.py)
        timings = json.loads((outputs / f"metrics/run/calibrate/tiny-llama-{variant}.json").read_text())
        assert timings["quantize_s"] == pytest.approx(timings["calibrate_s"] + timings["auto_quantize_s"], abs=0.002)
        assert "seconds" not in details["auto"] and "quantize_seconds" not in results
    bundle = json.loads((outputs / f"data/bundles/tiny-llama-{variant}-b200/manifest.json").read_text())
    table = {row["engine"]: row for row in bundle["details"]["compatibility"]}
    assert table["tensorrt-llm"]["loads"], table["tensorrt-llm"]
    assert not table["vllm"]["loads"] and "MIXED_PRECISION" in table["vllm"]["reason"]
