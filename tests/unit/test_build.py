"""The build stage on CPU: a bundle from a fabricated calibrate output (no ModelOpt), its files,
manifest and metrics; refusals before anything is written; never half a bundle."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pipeline.stages
from pipeline import cli
from pipeline.core.errors import ForgeError, RecipeError, StageInputError
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.handoff.manifest import build_manifest, read_manifest, write_manifest
from pipeline.planning.validate import check_target
from pipeline.recipe.loading import load_recipe
from pipeline.serving.trtllm import LocalRuntime
from pipeline.serving.trtllm_options import llm_api_options
from pipeline.stages import build

ROOT = Path(__file__).resolve().parents[2]
CATALOG = DEFAULT_CATALOG
SMOL = Path("recipes/smollm2-135m-instruct")
CPU = LocalRuntime(tensorrt_llm_version=None, cuda_compute_capability=None, trtllm_build=None)

VARIANT = """quant: {{format: {fmt}, kv_cache_dtype: fp8}}
targets:
  {gpu}: {{max_input_len: 1024, max_output_len: 1024, max_seq_len: 8192, tp: {tp}, concurrency: 256}}
calibration: {{set: generated-en, num_samples: 4, seq_len: 64}}
eval: {{suite: smoke}}
build: {{engine: {engine}}}
"""


@pytest.fixture(autouse=True)
def _cpu_machine(monkeypatch):
    monkeypatch.chdir(ROOT)
    # Deterministic on any machine: this file tests the CPU behaviour (tests/gpu has the rest).
    monkeypatch.setattr(build, "detect_runtime", lambda: CPU)


def fabricate_calibrate_output(directory: Path, recipe_path: Path, quant_algo: str = "FP8", kv_algo: str | None = "FP8") -> Path:
    """What the calibrate stage leaves: checkpoint/ (unified HF layout), quant_state.pt, manifest."""
    ckpt = directory / "checkpoint"
    ckpt.mkdir(parents=True)
    quantization = {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_algo, "exclude_modules": ["lm_head"]}
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "quantization_config":
                                                  {"quant_method": "modelopt", **quantization}}))
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "0.47.0"},
                                                           "quantization": quantization}))
    (ckpt / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    torch.manual_seed(0)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(8, 16).to(torch.float8_e4m3fn),
               "model.layers.0.mlp.up_proj.weight_scale": torch.tensor(0.01),
               "model.layers.0.mlp.up_proj.input_scale": torch.tensor(0.02)}, ckpt / "model-00001-of-00002.safetensors")
    save_file({"lm_head.weight": torch.randn(4, 16).to(torch.bfloat16)}, ckpt / "model-00002-of-00002.safetensors")
    (directory / "quant_state.pt").write_bytes(b"quant state placeholder")
    recipe = load_recipe(recipe_path)
    manifest = build_manifest("calibrate", recipe.id, directory, inputs={},
                              details={"format": "fp8", "kv_cache_dtype": "fp8", "quant_algo": quant_algo},
                              recipe=recipe.provenance("model", "quant", "calibration"))
    write_manifest(directory, manifest)
    return directory


def model_copy(tmp_path: Path, source: str, variant: str, **fields) -> Path:
    """A recipe beside a copy of a shipped model directory (model.yaml + config.json)."""
    model_dir = tmp_path / "recipes" / source
    if not model_dir.exists():
        shutil.copytree(ROOT / "recipes" / source, model_dir)
    values = {"fmt": "fp8", "gpu": "h200", "tp": 1, "engine": "pytorch", **fields}
    path = model_dir / f"{variant}.yaml"
    path.write_text(VARIANT.format(**values))
    return path


@pytest.fixture
def smol(tmp_path):
    recipe = SMOL / "fp8.yaml"
    quantized = fabricate_calibrate_output(tmp_path / "quantized", recipe)
    return recipe, quantized, tmp_path / "bundles" / "smol-fp8-h200", tmp_path / "metrics" / "build.json"


def test_bundle_holds_planner_sized_options_commands_and_manifest(smol):
    recipe_path, quantized, out, metrics = smol
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")

    assert sorted(p.name for p in out.iterdir()) == ["SERVE.md", "checkpoint", "commands.json", "llm_api_options.yaml", "manifest.json"]
    recipe = load_recipe(recipe_path)
    plan = check_target(recipe, "h200", load_catalog(CATALOG))
    options = yaml.safe_load((out / "llm_api_options.yaml").read_text())
    assert options == llm_api_options(plan, recipe.spec.targets["h200"], "fp8", "fp8")
    assert options["kv_cache_config"]["max_tokens"] == plan.kv_capacity_tokens
    assert options["max_batch_size"] == 256 and options["max_seq_len"] == 8192 and options["max_input_len"] == 2048

    manifest = read_manifest(out, "build")
    d = manifest["details"]
    assert manifest["subject"] == "smollm2-135m-instruct-fp8-h200"
    assert manifest["recipe"]["sections"]["targets.h200"] == recipe.section_digest("targets.h200")
    assert (d["model"], d["format"], d["gpu"], d["compute_capability"], d["tp"]) == ("smollm2-135m-instruct", "fp8", "h200", "9.0", 1)
    upstream_tools = read_manifest(quantized, "calibrate")["tools"]
    assert d["made_for"] == {"tensorrt_llm": "1.2.1", "nvidia-modelopt": upstream_tools["nvidia-modelopt"]}
    assert d["made_for"]["nvidia-modelopt"]  # the venv has ModelOpt, so the calibrate manifest names it
    assert d["plan"]["kv_capacity_tokens"] == plan.kv_capacity_tokens
    assert manifest["inputs"]["quantized"]["stage"] == "calibrate"
    assert set(manifest["files"]) == {"SERVE.md", "commands.json", "llm_api_options.yaml", "checkpoint/config.json",
                                      "checkpoint/hf_quant_config.json", "checkpoint/tokenizer.json",
                                      "checkpoint/model-00001-of-00002.safetensors", "checkpoint/model-00002-of-00002.safetensors"}
    commands = json.loads((out / "commands.json").read_text())
    assert commands["trtllm_serve"]["shell"] == (
        "trtllm-serve checkpoint --backend pytorch --tp_size 1 --extra_llm_api_options llm_api_options.yaml")
    assert "--max-num-seqs 256" in commands["vllm_serve"]["shell"]
    serve_md = (out / "SERVE.md").read_text()
    assert commands["sglang_serve"]["shell"] in serve_md and commands["trtllm_bench"]["shell"] in serve_md


def test_cpu_machine_records_load_test_not_run_with_reason(smol):
    recipe_path, quantized, out, metrics = smol
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")
    details = read_manifest(out, "build")["details"]
    assert details["load_tested"] is False
    assert details["load_test"]["reason"] == (
        "not run: this machine lacks a CUDA GPU, tensorrt_llm")
    assert details["load_test"]["runtime_kv_capacity_tokens"] is None
    # The DVC metrics file: the build KPIs only, numbers with human names (pipeline/handoff/kpis.py).
    values = json.loads(metrics.read_text())
    assert values == {"weights_bytes_per_gpu": details["plan"]["weights_bytes_per_gpu"],
                      "kv_capacity_tokens": details["plan"]["kv_capacity_tokens"]}
    assert details["checkpoint"]["bytes"] == sum(p.stat().st_size for p in (quantized / "checkpoint").iterdir())


def test_wrong_gpu_model_is_not_pretended_either(smol, monkeypatch):
    recipe_path, quantized, out, metrics = smol
    monkeypatch.setattr(build, "detect_runtime", lambda: LocalRuntime("1.2.1", "10.0", None))  # a B200 node
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")
    details = read_manifest(out, "build")["details"]
    assert details["load_tested"] is False
    assert details["load_test"]["reason"] == "not run: this machine lacks a GPU of compute capability 9.0 (this one is 10.0)"


def test_checkpoint_is_hard_linked_on_the_same_filesystem(smol):
    recipe_path, quantized, out, metrics = smol
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "never")
    for name in ("model-00001-of-00002.safetensors", "config.json"):
        assert (out / "checkpoint" / name).stat().st_ino == (quantized / "checkpoint" / name).stat().st_ino
    details = read_manifest(out, "build")["details"]
    assert details["checkpoint"] == {"files": 5, "bytes": details["checkpoint"]["bytes"], "linked": "hardlink"}
    assert details["load_test"]["reason"] == "skipped: --load-test never"


def test_falls_back_to_copy_across_filesystems(smol, monkeypatch, caplog):
    recipe_path, quantized, out, metrics = smol

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(build.os, "link", cross_device)
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "never")
    src = quantized / "checkpoint" / "model-00001-of-00002.safetensors"
    dst = out / "checkpoint" / src.name
    assert dst.read_bytes() == src.read_bytes() and dst.stat().st_ino != src.stat().st_ino
    assert read_manifest(out, "build")["details"]["checkpoint"]["linked"] == "copy"
    assert "copying instead" in caplog.text


def _no_output(out: Path, metrics: Path) -> None:
    assert not out.exists()
    assert not metrics.exists()
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir()] == []  # no staging directory left behind


def test_format_not_supported_on_gpu_is_refused_before_writing(tmp_path):
    recipe_path = model_copy(tmp_path, "smollm2-135m-instruct", "nvfp4-hopper", fmt="nvfp4")
    quantized = fabricate_calibrate_output(tmp_path / "q", recipe_path, "NVFP4")
    out, metrics = tmp_path / "bundles" / "b", tmp_path / "m.json"
    with pytest.raises(RecipeError) as info:
        build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")
    assert str(info.value) == (
        f"{recipe_path}: targets.h200: nvfp4 needs compute capability >= 10.0, h200 is 9.0. "
        "Fix: target b200 or rtx-pro-6000, or use fp8."
    )
    _no_output(out, metrics)


def test_weights_over_memory_is_refused_with_numbers_and_tp_fix(tmp_path):
    recipe_path = model_copy(tmp_path, "llama-3-3-70b-instruct", "fp8-l40s-tp1", gpu="l40s", tp=1)
    out, metrics = tmp_path / "bundles" / "b", tmp_path / "m.json"
    # 72.66 GB FP8 weights; reserve 1 GiB + 8192 tokens x (2x8192 + 2x28672) x 2 bytes = 2.28 GB.
    with pytest.raises(RecipeError) as info:  # refused before the (absent) upstream is even read
        build.main(recipe_path, "l40s", tmp_path / "never-read", out, metrics, CATALOG, "auto")
    assert str(info.value) == (
        f"{recipe_path}: targets.l40s: llama-3-3-70b-instruct fp8 does not fit: weights 72.7 GB/GPU + reserve "
        "2.3 GB exceed 48 GB at TP 1 (max_seq_len 8192). Fix: set tp: 2 (the smallest TP that fits on l40s), or a "
        "smaller format or max_seq_len; also fits: w4a8_mxfp4_fp8 on b200 x1 (max batch 100), nvfp4 on b200 x1 "
        "(max batch 98), fp8 on b200 x1 (max batch 78)."
    )
    _no_output(out, metrics)


def test_unknown_target_is_refused(smol):
    recipe_path, quantized, out, metrics = smol
    with pytest.raises(RecipeError, match=r"targets: no target 'b200' in this recipe\. Fix: pass --gpu h200"):
        build.main(recipe_path, "b200", quantized, out, metrics, CATALOG, "auto")
    _no_output(out, metrics)


def test_checkpoint_of_another_format_is_refused(tmp_path):
    recipe_path = SMOL / "fp8.yaml"
    quantized = fabricate_calibrate_output(tmp_path / "q", SMOL / "fp8.yaml", quant_algo="NVFP4")
    out, metrics = tmp_path / "bundles" / "b", tmp_path / "m.json"
    with pytest.raises(StageInputError) as info:
        build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")
    assert "quant_algo is 'NVFP4', but recipes/smollm2-135m-instruct/fp8.yaml asks for fp8 (quant_algo 'FP8')" in str(info.value)
    _no_output(out, metrics)


def test_quant_algo_check_is_case_insensitive(tmp_path):
    # ModelOpt 0.47 writes MXFP4 as "mxfp4" (seen in its exports here); the registry's spelling is compared loosely.
    recipe_path = SMOL / "fp8.yaml"
    quantized = fabricate_calibrate_output(tmp_path / "q", SMOL / "fp8.yaml", quant_algo="fp8", kv_algo="fp8")
    build.main(recipe_path, "h200", quantized, tmp_path / "b", tmp_path / "m.json", CATALOG, "never")
    assert read_manifest(tmp_path / "b", "build")["details"]["quant_algo"] == "fp8"


def test_missing_kv_scales_are_refused(tmp_path):
    quantized = fabricate_calibrate_output(tmp_path / "q", SMOL / "fp8.yaml", kv_algo=None)
    with pytest.raises(StageInputError, match=r"kv_cache_quant_algo is None, but the recipe's kv_cache_dtype fp8 needs 'FP8'"):
        build.main(SMOL / "fp8.yaml", "h200", quantized, tmp_path / "b", tmp_path / "m.json", CATALOG, "auto")


def test_modified_upstream_file_is_refused(smol):
    recipe_path, quantized, out, metrics = smol
    (quantized / "checkpoint" / "tokenizer.json").write_text("{}")
    with pytest.raises(StageInputError, match="does not match the manifest"):
        build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")
    _no_output(out, metrics)


def test_calibration_of_another_recipe_is_refused(tmp_path):
    quantized = fabricate_calibrate_output(tmp_path / "q", SMOL / "nvfp4.yaml")
    with pytest.raises(StageInputError, match="was made for recipe 'smollm2-135m-instruct-nvfp4', not 'smollm2-135m-instruct-fp8'"):
        build.main(SMOL / "fp8.yaml", "h200", quantized, tmp_path / "b", tmp_path / "m.json", CATALOG, "auto")


def test_calibration_without_recipe_id_is_refused(tmp_path):
    # Build's check used to let a manifest without `recipe.id` pass; the one reader does not.
    quantized = fabricate_calibrate_output(tmp_path / "q", SMOL / "fp8.yaml")
    old = read_manifest(quantized, "calibrate")
    write_manifest(quantized, {**old, "recipe": {**old["recipe"], "id": None}})
    with pytest.raises(StageInputError, match="records no recipe id, so it cannot be tied to 'smollm2-135m-instruct-fp8'"):
        build.main(SMOL / "fp8.yaml", "h200", quantized, tmp_path / "b", tmp_path / "m.json", CATALOG, "auto")


def test_failure_mid_build_leaves_no_bundle(smol, monkeypatch):
    recipe_path, quantized, out, metrics = smol

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "write_options", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")
    _no_output(out, metrics)
    assert (quantized / "checkpoint" / "config.json").is_file()  # upstream untouched


def test_failure_mid_rebuild_keeps_the_previous_bundle(smol, monkeypatch):
    recipe_path, quantized, out, metrics = smol
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "never")
    before = read_manifest(out, "build")["files"]
    monkeypatch.setattr(build, "run_load_test", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    monkeypatch.setattr(build, "detect_runtime", lambda: LocalRuntime("1.2.1", "9.0", None))
    with pytest.raises(RuntimeError, match="CUDA error"):
        build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")
    assert read_manifest(out, "build")["files"] == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_required_load_test_on_cpu_is_refused_before_writing(smol):
    recipe_path, quantized, out, metrics = smol
    with pytest.raises(ForgeError) as info:
        build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "require")
    assert str(info.value) == (
        "recipes/smollm2-135m-instruct/fp8.yaml: targets.h200: a load test is required, but this machine lacks "
        "a CUDA GPU, tensorrt_llm. Fix: run on a GPU node of compute capability 9.0 with tensorrt_llm installed "
        "(NGC container nvcr.io/nvidia/tensorrt-llm/release), or pass --load-test auto."
    )
    _no_output(out, metrics)


def test_load_test_result_is_recorded_when_the_runtime_is_there(smol, monkeypatch):
    recipe_path, quantized, out, metrics = smol
    from pipeline.serving.trtllm import LoadTestResult

    seen = {}

    def fake_load_test(model_dir, options):
        seen["files"] = sorted(p.name for p in model_dir.iterdir())
        seen["options"] = options
        return LoadTestResult(True, None, "The capital of France is", " Paris.", 1_000_000, 12.5)

    monkeypatch.setattr(build, "detect_runtime", lambda: LocalRuntime("1.2.1", "9.0", None))
    monkeypatch.setattr(build, "run_load_test", fake_load_test)
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "require")
    assert "hf_quant_config.json" in seen["files"]  # it loaded the staged bundle's checkpoint
    details = read_manifest(out, "build")["details"]
    predicted = details["plan"]["kv_capacity_tokens"]
    assert details["load_tested"] is True
    assert details["load_test"]["predicted_kv_capacity_tokens"] == predicted
    assert details["load_test"]["runtime_over_predicted"] == round(1_000_000 / predicted, 4)
    assert read_manifest(out, "build")["details"]["load_test"]["runtime_kv_capacity_tokens"] == 1_000_000


def test_engine_tensorrt_without_gpu_is_refused_before_writing(tmp_path):
    recipe_path = model_copy(tmp_path, "smollm2-135m-instruct", "fp8-engine", engine="tensorrt")
    quantized = fabricate_calibrate_output(tmp_path / "q", recipe_path)
    out, metrics = tmp_path / "bundles" / "b", tmp_path / "m.json"
    with pytest.raises(ForgeError) as info:
        build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "auto")
    text = str(info.value)
    assert text.startswith(f"{recipe_path}: build.engine: engine: tensorrt builds a TensorRT engine, which needs a CUDA GPU, "
                           "tensorrt_llm, the trtllm-build command")
    assert "Fix: run this stage on a GPU node of compute capability 9.0 inside the NGC container" in text
    _no_output(out, metrics)


def test_cli_verb(smol, monkeypatch, capsys):
    recipe_path, quantized, out, metrics = smol
    monkeypatch.setattr(pipeline.stages, "STAGE_MODULES", ("build",))
    argv = ["build", str(recipe_path), "--gpu", "h200", "--quantized", str(quantized), "--out", str(out),
            "--metrics", str(metrics), "--load-test", "never"]
    assert cli.main(argv) == 0
    assert read_manifest(out, "build")["details"]["load_tested"] is False
    assert cli.main(argv[:3] + ["b200"] + argv[4:]) == 2
    assert "no target 'b200' in this recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["build", "--help"])
    assert "forge build recipes/smollm2-135m-instruct/fp8.yaml --gpu h200" in capsys.readouterr().out


def _rewrite_checkpoint(quantized: Path, tensors: dict, exclude: list[str] | None = None) -> None:
    """Change the fabricated calibrate output's weights (and exclude list), then re-seal its manifest."""
    ckpt = quantized / "checkpoint"
    save_file(tensors, ckpt / "model-00001-of-00002.safetensors")
    if exclude is not None:
        for name, key in (("hf_quant_config.json", "quantization"), ("config.json", "quantization_config")):
            data = json.loads((ckpt / name).read_text())
            data[key]["exclude_modules" if key == "quantization" else "ignore"] = exclude
            (ckpt / name).write_text(json.dumps(data))
    old = read_manifest(quantized, "calibrate")
    write_manifest(quantized, build_manifest("calibrate", old["subject"], quantized, inputs={},
                                             details=old["details"], recipe=old["recipe"]))


def _fp8_mlp(gate_scale: float, up_scale: float) -> dict:
    out = {}
    for name, scale in (("gate_proj", gate_scale), ("up_proj", up_scale)):
        out[f"model.layers.0.mlp.{name}.weight"] = torch.ones(8, 16).to(torch.float8_e4m3fn)
        out[f"model.layers.0.mlp.{name}.weight_scale"] = torch.tensor(scale)
        out[f"model.layers.0.mlp.{name}.input_scale"] = torch.tensor(0.02)
    return out


def test_manifest_has_the_compatibility_table_and_serve_md_only_the_loaders(smol):
    recipe_path, quantized, out, metrics = smol
    # Unequal gate/up scales: GPU engines re-quantize at load, vLLM's CPU build cannot.
    _rewrite_checkpoint(quantized, _fp8_mlp(0.01, 0.02))
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "never")
    table = read_manifest(out, "build")["details"]["compatibility"]
    assert [(r["engine"], r["device"], r["loads"]) for r in table] == [
        ("tensorrt-llm", "h200", True), ("vllm", "h200", True), ("vllm-cpu", "cpu", False), ("sglang", "h200", True)]
    assert set(table[0]) == {"engine", "version", "device", "loads", "reason", "flags"}
    assert table[2]["reason"] == "model.layers.0.mlp: fused shards have different weight_scale"
    serve_md = (out / "SERVE.md").read_text()
    commands = json.loads((out / "commands.json").read_text())
    assert commands["trtllm_serve"]["shell"] in serve_md
    assert commands["vllm_serve"]["shell"].endswith("--kv-cache-dtype fp8 --quantization modelopt")
    assert commands["vllm_serve"]["shell"] in serve_md
    assert "--quantization modelopt_fp8" in commands["sglang_serve"]["shell"] in serve_md
    assert "vllm.entrypoints.openai.api_server" not in serve_md  # the refusing CPU engine gets no command
    assert "| vllm-cpu | 0.32.0 | cpu | refuses | model.layers.0.mlp: fused shards have different weight_scale | - |" in serve_md


def test_serve_md_drops_an_engine_that_refuses_and_adds_the_cpu_smoke_test(smol):
    recipe_path, quantized, out, metrics = smol
    # "*gate_up*" is TensorRT-LLM's fused name: it would load FP8 gate/up as unquantized.
    _rewrite_checkpoint(quantized, _fp8_mlp(0.01, 0.01), exclude=["lm_head", "*gate_up*"])
    build.main(recipe_path, "h200", quantized, out, metrics, CATALOG, "never")
    table = {r["engine"]: r for r in read_manifest(out, "build")["details"]["compatibility"]}
    assert not table["tensorrt-llm"]["loads"] and table["vllm-cpu"]["loads"]
    serve_md = (out / "SERVE.md").read_text()
    assert "trtllm-serve" not in serve_md and "trtllm-bench" not in serve_md
    assert "## Equivalent launch: vLLM" in serve_md
    # the CLI module fails on vllm-cpu (PackageNotFoundError: vllm); the API server module does not
    assert ("python -m vllm.entrypoints.openai.api_server --model checkpoint --quantization modelopt --dtype bfloat16 "
            "--enable-lora --lora-target-modules down_proj --kv-cache-dtype fp8") in serve_md
