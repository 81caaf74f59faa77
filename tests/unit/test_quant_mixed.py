"""Per-layer formats on a tiny random Llama, CPU: overrides, fused-group refusal, auto_quantize,
searching algorithms through forge's FP4 reference, the MIXED_PRECISION export against the engine
contracts, and effective bits (nvidia-modelopt 0.47)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import random_tiny_llama

pytest.importorskip("modelopt.torch.quantization")

from pipeline.core.errors import CalibrationError, RecipeError
from pipeline.core.formats import ComputeCapability
from pipeline.engines.checkpoint_check import check_checkpoint
from pipeline.engines.contracts import ENGINES
from pipeline.engines.export_rules import TensorInfo
from pipeline.quant import mixed
from pipeline.quant.bits import checkpoint_bits, effective_bits
from pipeline.quant.hf_export import export_unified
from pipeline.quant.modelopt_glue import calibrate
from pipeline.quant.simulate import reference_fp4_simulation
from pipeline.recipe.schema import QuantSection
from pipeline.stages.calibrate import verify_export

B200, H200 = ComputeCapability(10, 0), ComputeCapability(9, 0)


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 256, (2, 32), generator=g), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
            for _ in range(3)]


def _quantize(quant: QuantSection, batches, out: Path | None = None) -> tuple[torch.nn.Module, dict]:
    model = random_tiny_llama()
    auto = mixed.search_auto(model, quant, batches, torch.device("cpu")) if quant.auto else None
    config = mixed.quant_config_for(quant, auto.entries if auto else None)
    calibrate(model, config, batches, progress=False, before_calibration=mixed.check_fused_groups)
    formats = mixed.layer_formats(model)
    with torch.no_grad(), reference_fp4_simulation(model):
        logits = model(**batches[0]).logits
    assert torch.isfinite(logits).all()
    if out is not None:
        export_unified(model, out)
    return model, {"formats": formats, "auto": auto}


def test_overrides_give_layers_their_formats(batches):
    quant = QuantSection(format="nvfp4", overrides={"*layers.1.mlp.down_proj": "fp8", "*layers.0.self_attn.*": "bf16"})
    _, got = _quantize(quant, batches)
    f = got["formats"]
    assert f["model.layers.1.mlp.down_proj"] == "fp8"
    assert {f[f"model.layers.0.self_attn.{p}_proj"] for p in "qkvo"} == {"bf16"}
    assert f["model.layers.1.self_attn.q_proj"] == "nvfp4" and f["lm_head"] == "bf16"


def test_an_override_that_splits_a_fused_group_is_refused_before_calibration(batches):
    quant = QuantSection(format="nvfp4", overrides={"model.layers.0.self_attn.k_proj": "fp8"})
    model = random_tiny_llama()
    seen = []
    model.register_forward_hook(lambda *_: seen.append(1))
    with pytest.raises(RecipeError) as err:
        calibrate(model, mixed.quant_config_for(quant), batches, progress=False,
                       before_calibration=mixed.check_fused_groups)
    assert "quant.overrides: 1 fused group(s) split across formats: model.layers.0.self_attn (q_proj nvfp4, k_proj fp8, " \
           "v_proj nvfp4)" in str(err.value)
    assert not seen  # no calibration forward pass ran


@pytest.mark.parametrize("algorithm", ["mse", "gptq"])
def test_searching_algorithms_calibrate_nvfp4_on_cpu_through_the_reference(algorithm, batches, tmp_path):
    quant = QuantSection(format="nvfp4", algorithm=algorithm, kv_cache_dtype="auto")
    _quantize(quant, batches, tmp_path / "ckpt")
    assert verify_export(tmp_path / "ckpt", "nvfp4", "auto", ["NVFP4"])["quant_algo"] == "NVFP4"
    verdict = check_checkpoint(tmp_path / "ckpt", ENGINES["tensorrt-llm"], "b200", B200)
    assert verdict.loads, verdict.reason


def test_awq_calibrates_on_cpu_but_its_export_is_refused(batches, tmp_path):
    """AWQ's search runs through the reference on CPU (pre_quant_scale found); its export is
    NVFP4_AWQ with gate/up weight_scale_2 no longer equal after ModelOpt's re-smoothing, which the
    export check refuses (engines would mis-scale a fused gate_up) - pipeline/quant/algorithms.py."""
    quant = QuantSection(format="nvfp4", algorithm="awq_lite", kv_cache_dtype="auto")
    _model, _ = _quantize(quant, batches, tmp_path / "ckpt")
    algo = json.loads((tmp_path / "ckpt/hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    assert algo == "NVFP4_AWQ"
    with pytest.raises(CalibrationError, match="fused shards have different weight_scale_2"):
        verify_export(tmp_path / "ckpt", "nvfp4", "auto", ["NVFP4", "NVFP4_AWQ"])
    assert not check_checkpoint(tmp_path / "ckpt", ENGINES["tensorrt-llm"], "b200", B200).loads


@pytest.fixture(scope="module")
def mixed_export(batches, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mixed") / "ckpt"
    quant = QuantSection(format="nvfp4", auto={"effective_bits": 6.0, "formats": ["nvfp4", "fp8"], "score_batches": 2})
    _, got = _quantize(quant, batches, out)
    return out, got


def test_auto_quantize_on_cpu_exports_mixed_precision_that_tensorrt_llm_loads(mixed_export):
    ckpt, got = mixed_export
    auto = got["auto"]
    assert set(auto.formats) <= {"nvfp4", "fp8", "bf16"} and auto.formats.get("fp8") and auto.formats.get("nvfp4")
    assert auto.modelopt_target_bits > auto.target_bits  # lm_head counted at 16 bits in ModelOpt's cost
    quant = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "MIXED_PRECISION" and "lm_head" not in quant["quantized_layers"]
    verify_export(ckpt, "nvfp4", "fp8", ["NVFP4", "MIXED_PRECISION"])
    assert check_checkpoint(ckpt, ENGINES["tensorrt-llm"], "b200", B200).loads
    h200 = check_checkpoint(ckpt, ENGINES["tensorrt-llm"], "h200", H200)
    assert not h200.loads and "needs compute capability >= 10.0" in h200.reason
    vllm = check_checkpoint(ckpt, ENGINES["vllm"], "b200", B200)
    assert not vllm.loads and "'MIXED_PRECISION' is not accepted" in vllm.reason
    bits = checkpoint_bits(ckpt, "nvfp4")
    assert 4.5 < bits.effective_bits < 6.1 and set(bits.by_format) <= {"nvfp4", "fp8", "bf16"}


def test_a_mixed_export_with_a_split_fused_group_is_refused(mixed_export, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mixed_export[0], ckpt)
    path = ckpt / "hf_quant_config.json"
    data = json.loads(path.read_text())
    layers = data["quantization"]["quantized_layers"]
    q = next(m for m in layers if m.endswith("self_attn.q_proj"))
    layers[q.replace("q_proj", "k_proj")] = {"quant_algo": "FP8"} if layers[q]["quant_algo"] == "NVFP4" else \
        {"quant_algo": "NVFP4", "group_size": 16}
    path.write_text(json.dumps(data))
    verdict = check_checkpoint(ckpt, ENGINES["tensorrt-llm"], "b200", B200)
    assert not verdict.loads and "fused shards in different formats" in verdict.reason
    with pytest.raises(CalibrationError, match="fused shards in different formats"):
        verify_export(ckpt, "nvfp4", "fp8", ["NVFP4", "MIXED_PRECISION"])


def test_effective_bits_counts_scales_and_leaves_out_embeddings():
    t = TensorInfo
    tensors = {
        "model.embed_tokens.weight": t("BF16", (100, 64)),
        "model.layers.0.a.weight": t("U8", (32, 32)),           # NVFP4 [32, 64]: 1024 B
        "model.layers.0.a.weight_scale": t("F8_E4M3", (32, 4)),  # 128 B
        "model.layers.0.a.weight_scale_2": t("F32", ()),
        "model.layers.0.a.input_scale": t("F32", ()),
        "model.layers.0.b.weight": t("F8_E4M3", (32, 64)),      # FP8: 2048 B
        "model.layers.0.b.weight_scale": t("F32", ()),
        "model.layers.0.b.input_scale": t("F32", ()),
        "model.layers.0.b.k_scale": t("F32", ()),               # KV scale: not a weight's
        "model.layers.0.c.weight": t("BF16", (32, 64)),         # kept BF16
        "model.norm.weight": t("BF16", (64,)),
    }
    report = effective_bits(tensors, {"model.layers.0.a": "nvfp4", "model.layers.0.b": "fp8"})
    assert report.counted_weights == 3 * 2048
    assert report.counted_bits == 8 * ((1024 + 128 + 8) + (2048 + 8) + 4096)
    assert report.effective_bits == pytest.approx((4.53125 + 8.03125 + 16) / 3)
    assert report.by_format == {"bf16": 2048, "fp8": 2048, "nvfp4": 2048}
    whole_bytes = 12800 + 1024 + 128 + 8 + 2048 + 8 + 4 + 4096 + 128
    assert report.whole_values == 6400 + 3 * 2048 + 64
    assert report.whole_checkpoint_bits == pytest.approx(8 * whole_bytes / report.whole_values)
    with pytest.raises(ValueError, match="no Linear weights"):
        effective_bits({"lm_head.weight": t("BF16", (4, 4))}, {})
