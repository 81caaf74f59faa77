"""pipeline/quant/kv_numerics.py engine_kv_numerics: the FP8 KV cache as each engine computes it."""

from __future__ import annotations

import copy

import modelopt.torch.quantization as mtq
import pytest
import torch
from modelopt.torch.quantization.utils import update_quant_cfg_with_kv_cache_quant

from pipeline.core.errors import CalibrationError
from pipeline.quant.kv_numerics import e4m3_round_toward_zero, engine_kv_numerics, fp8_kv_quantize_dequantize
from tests.tiny_models import random_tiny_llama


def _e4m3_grid() -> torch.Tensor:
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.unique(values[torch.isfinite(values) & (values >= 0)])


def test_truncation_is_the_largest_e4m3_value_not_above_the_input():
    grid = _e4m3_grid()
    x = torch.cat([torch.rand(4000) * 448, torch.rand(2000) * 0.05, grid])
    x = torch.cat([x, -x])
    got = e4m3_round_toward_zero(x)
    index = torch.searchsorted(grid, x.abs(), right=True) - 1
    assert torch.equal(got, torch.sign(x) * grid[index])


def test_truncation_differs_from_round_to_nearest_where_vllm_cpu_differs():
    x = torch.tensor([1.124, -1.2, 0.003])  # nearest: 1.125, -1.25, 0.00390625
    assert e4m3_round_toward_zero(x).tolist() == [1.0, -1.125, 0.001953125]
    assert fp8_kv_quantize_dequantize(x, 1.0, "nearest").tolist() == [1.125, -1.25, 0.00390625]
    # the scale moves small values out of E4M3's subnormals
    assert fp8_kv_quantize_dequantize(torch.tensor([0.003]), 0.003 / 448 * 100, "nearest").item() == pytest.approx(0.003, rel=0.07)


@pytest.fixture(scope="module")
def fp8_kv_model():
    model = random_tiny_llama(num_key_value_heads=4, max_position_embeddings=64)
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg = update_quant_cfg_with_kv_cache_quant(cfg, copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

    def forward_loop(m):
        with torch.no_grad():
            m(tokens)

    mtq.quantize(model, cfg, forward_loop)
    return model, tokens


@pytest.mark.parametrize("numerics, scale", [("vllm-cpu", "exported"), ("trtllm", "one")])
def test_engine_numerics_change_the_forward_and_are_restored(fp8_kv_model, numerics, scale):
    model, tokens = fp8_kv_model
    with torch.no_grad():
        before = model(tokens).logits
        with engine_kv_numerics(model, numerics) as report:
            during = model(tokens).logits
        after = model(tokens).logits
    assert report.routed == 2 * len(model.model.layers) and report.scale == scale
    amaxes = [float(m.self_attn.k_bmm_quantizer.amax) for m in model.model.layers]
    if numerics == "trtllm":  # TensorRT-LLM 1.2 ignores the checkpoint's KV scales
        assert report.to_dict()["scale_min"] == report.to_dict()["scale_max"] == 1.0
    else:  # vLLM uses the exported amax / 448
        assert report.scales["model.layers.0.self_attn.k"] == pytest.approx(amaxes[0] / 448)
    assert not torch.equal(before, during) and torch.equal(before, after)


def test_modelopt_numerics_change_nothing(fp8_kv_model):
    model, tokens = fp8_kv_model
    with torch.no_grad(), engine_kv_numerics(model, "modelopt") as report:
        assert report.routed == 0
        model(tokens)


def test_unknown_numerics_is_refused(fp8_kv_model):
    with pytest.raises(CalibrationError, match="unknown KV numerics 'sglang'"), \
            engine_kv_numerics(fp8_kv_model[0], "sglang"):
        pass


# ---------------------------------------------------------------------------- whose numerics, from the contracts


def test_target_numerics_come_from_the_engine_that_serves_the_target_gpu():
    """One source: the engine contracts. forge's bundles go to TensorRT-LLM on H200 (FP8 k/v scales
    ignored), the served comparison here to vllm-cpu (truncation); every name is a KV_NUMERICS key."""
    from pipeline.core.formats import ComputeCapability
    from pipeline.engines.contracts import ENGINES, target_kv_numerics
    from pipeline.quant.kv_numerics import KV_NUMERICS

    h200 = ComputeCapability(9, 0)
    choice = target_kv_numerics("fp8", "FP8", [("h200", h200)])
    assert (choice.numerics, choice.engine, choice.version, choice.gpu) == ("trtllm", "tensorrt-llm", "1.2.1", "h200")
    assert ENGINES["vllm-cpu"].kv_numerics == "vllm-cpu" and ENGINES["vllm"].kv_numerics == "modelopt"
    assert {e.kv_numerics for e in ENGINES.values()} <= set(KV_NUMERICS)
    # deterministic whatever the targets' order; no engine loads NVFP4 on Hopper: ModelOpt's own numerics
    b200 = ComputeCapability(10, 0)
    assert target_kv_numerics("nvfp4", "FP8", [("h200", h200), ("b200", b200)]).gpu == "b200"
    assert target_kv_numerics("nvfp4", "FP8", [("h200", h200)]).numerics == "modelopt"
