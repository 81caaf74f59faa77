"""Load a real bundle with TensorRT-LLM's LLM API and generate from it.

Skips unless CUDA is present with a compute capability some catalog GPU has (FP8 needs >= 8.9)
and tensorrt_llm is importable: skipped by capability, not by GPU name. The checkpoint is a tiny
random Llama quantized to FP8 with ModelOpt on this GPU, so the test needs no Hub access."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipeline.core.formats import FORMATS, ComputeCapability
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.handoff.manifest import build_manifest, read_manifest, write_manifest
from pipeline.stages import build

ROOT = Path(__file__).resolve().parents[2]
CATALOG = DEFAULT_CATALOG

pytestmark = pytest.mark.gpu


def _device_cc() -> ComputeCapability | None:
    if not torch.cuda.is_available():
        return None
    return ComputeCapability(*torch.cuda.get_device_capability(0))


def _catalog_gpu_for(cc: ComputeCapability) -> str | None:
    return next((key for key, spec in load_catalog(CATALOG).items() if spec.cc == cc), None)


@pytest.fixture
def gpu_key() -> str:
    cc = _device_cc()
    if cc is None:
        pytest.skip("needs a CUDA GPU")
    if not FORMATS["fp8"].min_compute_capability <= cc:
        pytest.skip(f"fp8 needs compute capability >= {FORMATS['fp8'].min_compute_capability}, this GPU is {cc}")
    if importlib.util.find_spec("tensorrt_llm") is None:
        pytest.skip("needs tensorrt_llm (NGC container nvcr.io/nvidia/tensorrt-llm/release)")
    key = _catalog_gpu_for(cc)
    if key is None:
        pytest.skip(f"no GPU of compute capability {cc} in pipeline/core/data/gpus.yaml")
    return key


def _quantized_dir(tiny_llama, directory: Path, recipe_id: str) -> Path:
    from pipeline.quant.hf_export import export_unified
    from pipeline.quant.modelopt_glue import calibrate
    from pipeline.quant.quant_config import build_quant_config

    model = copy.deepcopy(tiny_llama.model).cuda()
    ids = tiny_llama.tokenizer(["The river runs by the old mill."] * 4, return_tensors="pt", padding=True)
    batches = [{"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}]
    calibrate(model, build_quant_config("FP8_DEFAULT_CFG", "fp8", []), batches, progress=False)
    export_unified(model, directory / "checkpoint")
    tiny_llama.tokenizer.save_pretrained(directory / "checkpoint")
    (directory / "quant_state.pt").write_bytes(b"not used by the PyTorch-backend bundle")
    write_manifest(directory, build_manifest(
        "calibrate", recipe_id, directory, inputs={},
        details={"format": "fp8", "kv_cache_dtype": "fp8", "quant_algo": "FP8"},
        recipe={"id": recipe_id, "path": "", "digest": ""},
    ))
    return directory


def test_bundle_loads_generates_and_reports_kv_capacity(tiny_llama, gpu_key, tmp_path, monkeypatch):
    model_dir = tmp_path / "recipes" / "tiny-llama"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(tiny_llama.model.config.to_dict()))
    (model_dir / "model.yaml").write_text(
        f"source: {{kind: local, path: {tiny_llama.model_dir}}}\neval: {{suite: smoke}}\n")
    (model_dir / "fp8.yaml").write_text(
        "quant: {format: fp8, kv_cache_dtype: fp8}\n"
        f"targets:\n  {gpu_key}: {{max_input_len: 64, max_output_len: 32, max_num_tokens: 256, concurrency: 4,"
        " kv_cache_free_gpu_memory_fraction: 0.2}\n"
        "calibration: {set: generated-en, num_samples: 4, seq_len: 16}\neval: {suite: smoke}\n")
    monkeypatch.chdir(tmp_path)
    quantized = _quantized_dir(tiny_llama, tmp_path / "quantized", "tiny-llama-fp8")
    out, metrics = tmp_path / "bundle", tmp_path / "metrics.json"

    build.main(model_dir / "fp8.yaml", gpu_key, quantized, out, metrics, CATALOG, "require")

    details = read_manifest(out, "build")["details"]
    load = details["load_test"]
    assert details["load_tested"] is True
    assert load["output_text"].strip()
    runtime, predicted = load["runtime_kv_capacity_tokens"], load["predicted_kv_capacity_tokens"]
    assert runtime is not None and runtime > 0
    # max_tokens = the prediction and the smaller of the two budgets wins, so the runtime's pool
    # can be smaller (less free memory than planned) but never larger.
    assert runtime <= predicted
    assert json.loads(metrics.read_text())["load_tested"] is True
