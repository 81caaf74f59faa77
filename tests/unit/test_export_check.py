"""verify_unified_export against real ModelOpt 0.47 exports of a tiny random Llama (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import random_tiny_llama

pytest.importorskip("modelopt.torch.export")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pipeline.core.errors import CalibrationError
from pipeline.engines.export_rules import EXPORT_RULES, KV_EXPORT_RULES, verify_unified_export
from pipeline.quant.hf_export import export_unified
from pipeline.quant.modelopt_glue import calibrate
from pipeline.quant.quant_config import build_quant_config

LAYERS = 2
LINEARS = 7 * LAYERS

# format name -> (ModelOpt preset, KV cache, quant_algo as the format registry spells it, KV algo)
CASES = {
    "fp8": ("FP8_DEFAULT_CFG", "fp8", "FP8", "FP8"),
    "nvfp4": ("NVFP4_DEFAULT_CFG", "auto", "NVFP4", None),
    "mxfp4": ("MXFP4_DEFAULT_CFG", "auto", "mxfp4", None),
}


def tiny_llama() -> torch.nn.Module:
    return random_tiny_llama()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    g = torch.Generator().manual_seed(1)
    batches = [
        {
            "input_ids": torch.randint(0, 256, (2, 32), generator=g),
            "attention_mask": torch.ones(2, 32, dtype=torch.long),
        }
        for _ in range(2)
    ]
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, (preset, kv, _, _) in CASES.items():
        model = tiny_llama()
        calibrate(model, build_quant_config(preset, kv, []), batches, progress=False)
        out[name] = export_unified(model, root / name).path
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


@pytest.mark.parametrize("fmt", list(CASES))
def test_real_exports_pass(exports, fmt):
    _, _, algo, kv_algo = CASES[fmt]
    report = verify_unified_export(exports[fmt], algo, kv_algo, EXPORT_RULES[fmt])
    assert report.quantized_layers == LINEARS
    assert report.excluded_layers == 2  # embed_tokens and lm_head, kept BF16 by ModelOpt
    assert report.kv_scale_tensors == (2 * LAYERS if kv_algo else 0)
    # Linear weights: 2 layers x (3 x 64*64 attention-ish + 2 x 32*64 kv + 3 x 64*128 mlp).
    values = LAYERS * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    assert report.quantized_weight_bytes == values // (1 if fmt == "fp8" else 2)
    assert report.total_bytes == sum(p.stat().st_size for p in exports[fmt].iterdir())
    assert report.files["model.safetensors"] > report.quantized_weight_bytes


def test_mxfp4_algo_is_compared_case_insensitively(exports):
    report = verify_unified_export(exports["mxfp4"], "MXFP4", None, EXPORT_RULES["mxfp4"])
    assert report.quant_algo == "mxfp4"  # what ModelOpt 0.47 writes


def test_dropped_scale_is_named(exports, tmp_path):
    d = _copy(exports["nvfp4"], tmp_path)
    tensors = safetensors_torch.load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight_scale_2"]
    safetensors_torch.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CalibrationError) as err:
        verify_unified_export(d, "NVFP4", None, EXPORT_RULES["nvfp4"])
    assert str(err.value) == (
        f"{d}: export does not match NVFP4 (KV None): "
        "model.layers.1.mlp.down_proj.weight_scale_2 is missing (expected F32). "
        "Fix: re-run the calibrate stage with the pinned ModelOpt; never edit an export by hand."
    )


def test_wrong_quant_algo_is_reported(exports, tmp_path):
    d = _copy(exports["fp8"], tmp_path)
    hf = json.loads((d / "hf_quant_config.json").read_text())
    hf["quantization"]["quant_algo"] = "NVFP4"
    (d / "hf_quant_config.json").write_text(json.dumps(hf))
    with pytest.raises(CalibrationError) as err:
        verify_unified_export(d, "FP8", "FP8", EXPORT_RULES["fp8"])
    text = str(err.value)
    assert "hf_quant_config.json quant_algo is 'NVFP4', expected 'FP8'" in text
    assert "config.json quant_algo 'FP8' differs from hf_quant_config.json 'NVFP4'" in text


def test_wrong_format_rules_list_tensors_and_expectations(exports):
    with pytest.raises(CalibrationError) as err:
        verify_unified_export(exports["fp8"], "FP8", "FP8", EXPORT_RULES["nvfp4"])
    text = str(err.value)
    assert "model.layers.0.mlp.down_proj.weight is F8_E4M3, expected U8" in text
    assert "(and 4 more)" in text  # 14 Linears, 10 shown


def test_kv_cache_expectation_both_ways(exports):
    with pytest.raises(CalibrationError) as err:
        verify_unified_export(exports["nvfp4"], "NVFP4", "FP8", EXPORT_RULES["nvfp4"])
    text = str(err.value)
    assert "kv_cache_quant_algo is None, expected 'FP8'" in text
    assert "0 *.k_scale tensors for 2 layers" in text
    with pytest.raises(CalibrationError, match="KV cache expected unquantized but found"):
        verify_unified_export(exports["fp8"], "FP8", None, EXPORT_RULES["fp8"])


def test_unexcluded_bf16_linear_is_caught(exports, tmp_path):
    d = _copy(exports["fp8"], tmp_path)
    hf = json.loads((d / "hf_quant_config.json").read_text())
    hf["quantization"]["exclude_modules"] = ["model.embed_tokens"]  # lm_head no longer excluded
    (d / "hf_quant_config.json").write_text(json.dumps(hf))
    with pytest.raises(CalibrationError, match="lm_head.weight is BF16, expected F8_E4M3"):
        verify_unified_export(d, "FP8", "FP8", EXPORT_RULES["fp8"])


def test_missing_files_are_reported(exports, tmp_path):
    d = _copy(exports["mxfp4"], tmp_path)
    (d / "hf_quant_config.json").unlink()
    with pytest.raises(CalibrationError, match="hf_quant_config.json: is missing from the export"):
        verify_unified_export(d, "mxfp4", None, EXPORT_RULES["mxfp4"])


def test_rules_cover_the_format_registry():
    from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES

    assert set(EXPORT_RULES) == {n for n, f in FORMATS.items() if f.quantized}
    assert set(KV_EXPORT_RULES) == {n for n, k in KV_CACHE_DTYPES.items() if k.modelopt_config}


def _scalars(d: Path) -> dict[str, float]:
    tensors = safetensors_torch.load_file(d / "model.safetensors")
    return {k: float(v.float().item()) for k, v in tensors.items() if v.numel() == 1}


@pytest.mark.parametrize(
    ("fmt", "suffixes"), [("fp8", ("weight_scale", "input_scale")), ("nvfp4", ("weight_scale_2", "input_scale"))]
)
def test_fused_shards_share_scales_in_real_exports(exports, fmt, suffixes):
    values = _scalars(exports[fmt])
    for layer in range(LAYERS):
        for parent, shards in ((f"model.layers.{layer}.self_attn", ("q_proj", "k_proj", "v_proj")),
                               (f"model.layers.{layer}.mlp", ("gate_proj", "up_proj"))):
            for suffix in suffixes:
                got = {values[f"{parent}.{s}.{suffix}"] for s in shards}
                assert len(got) == 1, (parent, suffix, got)
    # The shared value is the group's max, not some other constant: o_proj/down_proj keep their own.
    assert values["model.layers.0.self_attn.o_proj.weight_scale" if fmt == "fp8"
                  else "model.layers.0.self_attn.o_proj.weight_scale_2"] != values[
        f"model.layers.0.self_attn.q_proj.{suffixes[0]}"]


def test_bare_modelopt_fp8_export_is_refused_for_unequal_shard_scales(tmp_path):
    """What ModelOpt 0.47 writes without forge's unification: one weight_scale per shard."""
    import modelopt.torch.quantization as mtq

    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 32), generator=g)
    mtq.quantize(model, build_quant_config("FP8_DEFAULT_CFG", "fp8", []), lambda m: m(input_ids=ids))
    d = export_unified(model, tmp_path / "bare").path
    with pytest.raises(CalibrationError) as err:
        verify_unified_export(d, "FP8", "FP8", EXPORT_RULES["fp8"])
    text = str(err.value)
    assert "model.layers.0.self_attn: fused shards have different weight_scale (q_proj " in text
    assert "model.layers.0.mlp: fused shards have different weight_scale (gate_proj " in text
    # Activations of one group see one input, so their input_scale is equal even unfused.
    assert "different input_scale" not in text


def test_tampered_nvfp4_global_scale_is_refused(exports, tmp_path):
    d = _copy(exports["nvfp4"], tmp_path)
    tensors = safetensors_torch.load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight_scale_2"
    tensors[name] = tensors[name] * 2
    safetensors_torch.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CalibrationError, match=r"model.layers.1.mlp: fused shards have different weight_scale_2 "
                                               r"\(gate_proj [0-9.e-]+, up_proj [0-9.e-]+\)"):
        verify_unified_export(d, "NVFP4", None, EXPORT_RULES["nvfp4"])
