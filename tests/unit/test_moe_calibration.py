"""Issue 24: a real-weight MoE on CPU. Sparse upcycling computes the dense model; calibration counts
the tokens each expert receives; a starved expert is calibrated (ModelOpt 0.47's fused experts share
the layer's input range and take weight ranges from each expert's own weights) and exported with every
scale; an export missing an expert's scale is refused."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_tiny_llama

pytest.importorskip("modelopt.torch.quantization")

from pipeline.core.errors import CalibrationError, SourceError
from pipeline.quant.experts import coverage
from pipeline.quant.hf_export import export_unified
from pipeline.quant.modelopt_glue import calibrate
from pipeline.quant.quant_config import build_quant_config
from pipeline.sizing.shapes import ModelShape, count_params
from pipeline.sources.routing import count_routing
from pipeline.sources.upcycle import probe, upcycled_model
from pipeline.stages.calibrate import verify_export

EXPERTS, TOP_K = 4, 2


@pytest.fixture
def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 256, (2, 32), generator=g), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
            for _ in range(3)]


def _upcycled(std: float = 0.5):
    dense = random_tiny_llama()
    return dense, upcycled_model(dense, EXPERTS, TOP_K, router_seed=0, router_std=std, where="test")


def test_upcycled_model_computes_the_dense_model_and_spreads_tokens():
    dense, moe = _upcycled()
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    diff, routed, tokens = probe(dense, moe, ids)
    assert diff < 1e-4  # float32 summation order only
    assert tokens == 64 and len(routed) == 2
    assert all(sum(layer) == TOP_K * 64 and min(layer) > 0 for layer in routed), routed
    # the planner counts the upcycled model as 4 copies of the dense MLP and a router per layer
    counts = count_params(ModelShape.from_hf_config(moe.config.to_dict()))
    dense_counts = count_params(ModelShape.from_hf_config(dense.config.to_dict()))
    assert counts.mlp == EXPERTS * dense_counts.mlp and counts.router == 2 * 64 * EXPERTS
    assert counts.total == sum(p.numel() for p in moe.parameters())


def test_only_a_bias_free_llama_is_upcycled():
    dense = random_tiny_llama()
    dense.config.mlp_bias = True
    with pytest.raises(SourceError, match="bias-free Llama layout"):
        upcycled_model(dense, EXPERTS, TOP_K, 0, 0.5, "recipes/x/model.yaml: source")


def _starve(moe, layer: int, expert: int) -> None:
    """Route no token of `layer` to `expert`: its router logit is -inf before the top-k."""
    gate = moe.model.layers[layer].mlp.gate

    def forward(hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
        logits[:, expert] = float("-inf")
        top, index = torch.topk(torch.softmax(logits.float(), dim=-1), gate.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    gate.forward = forward


def test_a_starved_expert_is_named_calibrated_and_exported_with_its_scales(batches, tmp_path):
    _, moe = _upcycled()
    _starve(moe, layer=1, expert=3)
    config = build_quant_config("FP8_DEFAULT_CFG", "fp8", [])
    with count_routing(moe) as routing:
        result = calibrate(moe, config, batches, progress=False, around_calibration=routing.counting())
    found = coverage(routing, moe)
    assert found["starved_experts"] == ["model.layers.1.mlp.experts.3"]
    assert found["routed_tokens"]["model.layers.1.mlp"][3] == 0
    assert sum(found["routed_tokens"]["model.layers.0.mlp"]) == TOP_K * 3 * 2 * 32  # every calibration token, k times
    assert found["starved_input_ranges"] == "shared with the layer's other experts"
    assert result.quantizer_summary.static_ranges > 0  # check_calibrated found every range
    export_unified(moe, tmp_path / "checkpoint")
    report = verify_export(tmp_path / "checkpoint", "fp8", "fp8")
    assert report["quantized_layers"] >= 2 * EXPERTS * 3  # w1, w2, w3 of every expert of both layers


def test_an_export_missing_an_experts_scale_is_refused(batches, tmp_path):
    from safetensors.torch import load_file, save_file

    _, moe = _upcycled()
    calibrate(moe, build_quant_config("FP8_DEFAULT_CFG", "fp8", []), batches, progress=False)
    export_unified(moe, tmp_path / "checkpoint")
    path = next((tmp_path / "checkpoint").glob("*.safetensors"))
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("experts.3.w1.input_scale"))
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CalibrationError, match=name.removesuffix(".input_scale").replace(".", r"\.")):
        verify_export(tmp_path / "checkpoint", "fp8", "fp8")


def test_the_upcycled_source_is_checked_by_the_schema():
    from pydantic import ValidationError

    from pipeline.recipe.schema import UpcycledSource

    dense = {"kind": "gguf", "path": "m.gguf", "sha256": "0" * 64}
    assert UpcycledSource(kind="upcycled", dense=dense, experts=4, top_k=2).router_seed == 0
    with pytest.raises(ValidationError, match="top_k 4 must be below experts 4"):
        UpcycledSource(kind="upcycled", dense=dense, experts=4, top_k=4)
    with pytest.raises(ValidationError, match="kind"):
        UpcycledSource(kind="upcycled", dense={"kind": "upcycled", "dense": dense, "experts": 2, "top_k": 1},
                       experts=4, top_k=2)  # one level: the dense source is never itself upcycled


# ---------------------------------------------------------------------------- which engine loads MoE experts


def test_moe_rows_of_the_engine_contracts():
    from pipeline.core.formats import ComputeCapability
    from pipeline.engines.contracts import ENGINES, MOE_LOADS, MOE_REFUSES, MOE_UNVERIFIED
    from pipeline.serving.engines_here import choose_engine
    from pipeline.serving.trtllm import LocalRuntime

    assert ENGINES["tensorrt-llm"].contract("FP8").moe == MOE_LOADS
    assert ENGINES["vllm-cpu"].contract(None).moe == MOE_LOADS  # BF16 experts: measured, served here
    assert ENGINES["vllm-cpu"].contract("FP8").moe == MOE_REFUSES
    assert ENGINES["sglang"].contract("FP8").moe == MOE_UNVERIFIED
    cpu_only = LocalRuntime(None, None, None)
    assert choose_engine(None, "auto", None, cpu_only, vllm_available=True, moe=True).engine == "vllm"
    fp8_moe = choose_engine("fp8", "fp8", ComputeCapability(9, 0), cpu_only, vllm_available=True, moe=True)
    assert fp8_moe.engine is None and "CUDA-only _C op" in fp8_moe.reason
    assert choose_engine("fp8", "auto", ComputeCapability(9, 0), cpu_only, vllm_available=True).engine == "vllm"  # dense


def test_an_moe_checkpoint_is_checked_against_the_moe_rows(tmp_path, batches):
    from pipeline.core.formats import ComputeCapability
    from pipeline.engines.checkpoint_check import compatibility_table

    _, moe = _upcycled()
    calibrate(moe, build_quant_config("FP8_DEFAULT_CFG", "fp8", []), batches, progress=False)
    export_unified(moe, tmp_path / "checkpoint")
    table = {v.engine: v for v in compatibility_table(tmp_path / "checkpoint", "h200", ComputeCapability(9, 0))}
    assert table["tensorrt-llm"].loads and "CUTLASS fused MoE" in table["tensorrt-llm"].reason
    assert not table["vllm-cpu"].loads and "FP8 mixture-of-experts" in table["vllm-cpu"].reason
    assert not table["sglang"].loads and "no verified contract" in table["sglang"].reason
