"""CPU simulation of ModelOpt NVFP4/MXFP4 on a tiny Llama, and checks of ModelOpt's export.

The tiny Llama is random-initialised with a fixed seed (no download). ModelOpt's export of the
same model is unpacked with the reference unpackers and compared with the reference qdq of the
original weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import random_tiny_llama

mtq = pytest.importorskip("modelopt.torch.quantization")
transformers = pytest.importorskip("transformers")

from modelopt.torch.export import export_hf_checkpoint
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
    is_registered_quant_backend,
)
from safetensors.torch import load_file

from pipeline.core.errors import CalibrationError
from pipeline.quant import simulate
from pipeline.quant.reference import (
    dequantize_mxfp4_export,
    dequantize_nvfp4_export,
    mxfp4_quantize_dequantize,
    nvfp4_quantize_dequantize,
)
from pipeline.quant.simulate import reference_fp4_simulation

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# ModelOpt's export gives layers that read the same input one shared weight_scale_2 (the max of
# their weight amaxes; `preprocess_linear_fusion` in modelopt/torch/export), so the reference
# global amax of such a layer is the group maximum.
FUSED_GROUPS = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.k_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.v_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
# One MXFP4 block of layer 0's q_proj row 0 is set to exact ties: amax 6 * 2**-4 makes the scale
# exactly 2**-4, and 0.75, 1.75, 3.5 (times the scale) are the midpoints where "toward zero" and
# "to even" disagree. Random fp32 weights practically never hit a tie.
TIE_SCALE = 2.0**-4
TIE_BLOCK = [6.0, 0.75, 1.75, 3.5, -0.75, -1.75, -3.5] + [0.0] * 25


@pytest.fixture(scope="module")
def tiny_llama():
    model = random_tiny_llama(num_key_value_heads=4, max_position_embeddings=64)
    with torch.no_grad():
        q_proj = model.model.layers[0].self_attn.q_proj.weight
        q_proj[0, :32] = torch.tensor(TIE_BLOCK) * TIE_SCALE
    return model


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def quantize(model, cfg, tokens):
    quantized = copy.deepcopy(model)
    calls = []

    def forward_loop(m):
        calls.append(1)
        with torch.no_grad():
            m(tokens)

    mtq.quantize(quantized, copy.deepcopy(cfg), forward_loop)
    return quantized, len(calls)


@pytest.fixture(scope="module")
def nvfp4_model(tiny_llama, tokens):
    return quantize(tiny_llama, mtq.NVFP4_DEFAULT_CFG, tokens)[0]


@pytest.fixture(scope="module")
def mxfp4_model(tiny_llama, tokens):
    return quantize(tiny_llama, mtq.MXFP4_DEFAULT_CFG, tokens)[0]


def quantizer_state(model):
    return {
        name: (q.backend, {k: v.clone() for k, v in q.state_dict().items()}, sorted(vars(q)))
        for name, q in model.named_modules()
        if isinstance(q, TensorQuantizer)
    }


def test_calibration_runs_on_cpu_without_simulation(tiny_llama, tokens):
    nvfp4, nvfp4_calls = quantize(tiny_llama, mtq.NVFP4_DEFAULT_CFG, tokens)
    _, mxfp4_calls = quantize(tiny_llama, mtq.MXFP4_DEFAULT_CFG, tokens)
    assert nvfp4_calls == 1  # max calibration ran its forward loop on CPU
    assert mxfp4_calls == 0  # MXFP4_DEFAULT_CFG has algorithm None: no calibration at all
    q = nvfp4.model.layers[0].self_attn.q_proj
    weight = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach()
    expected_weight_amax = float(weight.abs().max())
    assert float(q.weight_quantizer.amax) == pytest.approx(expected_weight_amax, rel=0, abs=0)
    assert float(q.input_quantizer.amax) > 0


def test_modelopt_fp4_forward_fails_on_cpu_without_simulation(nvfp4_model, mxfp4_model, tokens):
    # The reason this module exists; if a ModelOpt upgrade runs FP4 on CPU, revisit it.
    with pytest.raises(AssertionError, match="amax must be a CUDA tensor"):
        nvfp4_model(tokens)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        mxfp4_model(tokens)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_simulated_forward_runs_and_differs_from_unquantized(fmt, tiny_llama, nvfp4_model, mxfp4_model, tokens):
    model = nvfp4_model if fmt == "nvfp4" else mxfp4_model
    before = quantizer_state(model)
    with torch.no_grad(), reference_fp4_simulation(model) as report:
        logits = model(tokens).logits
    with torch.no_grad():
        baseline = tiny_llama(tokens).logits
    # 2 layers x 7 Linears x (weight, input) enabled; embed_tokens and lm_head quantizers disabled.
    assert report.applied
    assert report.routed_by_kind() == {"nvfp4": 32 if fmt == "nvfp4" else 0, "mxfp4": 32 if fmt == "mxfp4" else 0}
    assert report.disabled_routed == 4
    assert report.left_to_modelopt == 24  # output and attention-BMM quantizers, all 8-bit
    assert torch.isfinite(logits).all()
    diff = (logits - baseline).abs().max().item()
    assert 1e-3 < diff < 1.0
    after = quantizer_state(model)
    assert before.keys() == after.keys()
    for name, (backend, buffers, attrs) in before.items():
        assert after[name][0] == backend is None
        assert after[name][2] == attrs
        assert buffers.keys() == after[name][1].keys()
        for key, value in buffers.items():
            assert torch.equal(value, after[name][1][key])


@pytest.mark.parametrize("semantics", ["fake_quant", "export"])
def test_simulated_linear_equals_hand_built_nvfp4_qdq(nvfp4_model, semantics):
    layer = nvfp4_model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(2))
    # One block far below the calibrated input amax (~0.085): its E4M3 scale underflows, which
    # the GPU kernel ("flush") zeroes and the export ("clamp") keeps at the smallest subnormal.
    x[0, 0, :16] = 1e-7
    underflow = "flush" if semantics == "fake_quant" else "clamp"
    x_q = nvfp4_quantize_dequantize(x, layer.input_quantizer.amax, 16, scale_underflow=underflow)
    kept = {"flush": 0, "clamp": 16}[underflow]
    assert int(torch.count_nonzero(x_q[0, 0, :16])) == kept
    w_q = nvfp4_quantize_dequantize(layer.weight, layer.weight_quantizer.amax, 16, scale_underflow=underflow)
    expected = torch.nn.functional.linear(x_q, w_q)
    with torch.no_grad(), reference_fp4_simulation(nvfp4_model, semantics=semantics):
        actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert not torch.equal(actual, torch.nn.functional.linear(x, layer.weight))


@pytest.mark.parametrize(("semantics", "ties"), [("fake_quant", "even"), ("export", "zero")])
def test_simulated_linear_equals_hand_built_mxfp4_qdq(mxfp4_model, semantics, ties):
    layer = mxfp4_model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.linear(
        mxfp4_quantize_dequantize(x, 32, ties=ties),
        mxfp4_quantize_dequantize(layer.weight, 32, ties=ties),
    )
    with torch.no_grad(), reference_fp4_simulation(mxfp4_model, semantics=semantics):
        actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_nvfp4_export_equals_reference_qdq_of_original_weights(tiny_llama, tokens, tmp_path):
    model, _ = quantize(tiny_llama, mtq.NVFP4_DEFAULT_CFG, tokens)
    with torch.no_grad(), reference_fp4_simulation(model):
        model(tokens)  # the export must still work after a simulated forward
    export_hf_checkpoint(model, export_dir=tmp_path)
    exported = load_file(tmp_path / "model.safetensors")
    checked = 0
    for i, layer in enumerate(tiny_llama.model.layers):
        for name in LINEARS:
            prefix = f"model.layers.{i}.{name}"
            weight = layer.get_submodule(name).weight.detach()
            group_amax = max(float(layer.get_submodule(g).weight.detach().abs().max()) for g in FUSED_GROUPS[name])
            unpacked = dequantize_nvfp4_export(
                exported[f"{prefix}.weight"],
                exported[f"{prefix}.weight_scale"],
                exported[f"{prefix}.weight_scale_2"],
                weight.shape,
            )
            reference = nvfp4_quantize_dequantize(weight, torch.tensor(group_amax))
            # NVFP4 export and reference both round ties to even: no mismatch is allowed.
            assert int((unpacked != reference).sum()) == 0, prefix
            checked += weight.numel()
    assert checked == 2 * (4 * 64 * 64 + 3 * 64 * 128)


def test_mxfp4_export_equals_reference_qdq_with_ties_toward_zero(tiny_llama, tokens, tmp_path):
    model, _ = quantize(tiny_llama, mtq.MXFP4_DEFAULT_CFG, tokens)
    export_hf_checkpoint(model, export_dir=tmp_path)
    exported = load_file(tmp_path / "model.safetensors")
    tie_mismatches = 0
    for i, layer in enumerate(tiny_llama.model.layers):
        for name in LINEARS:
            prefix = f"model.layers.{i}.{name}"
            weight = layer.get_submodule(name).weight.detach()
            unpacked = dequantize_mxfp4_export(
                exported[f"{prefix}.weight"], exported[f"{prefix}.weight_scale"], weight.shape
            )
            # ModelOpt 0.47's MXFP4 export rounds ties toward zero: exact match with ties="zero".
            assert int((unpacked != mxfp4_quantize_dequantize(weight, ties="zero")).sum()) == 0
            # With ties to even (its CUDA kernel) only the planted ties may differ.
            differs = unpacked != mxfp4_quantize_dequantize(weight, ties="even")
            tie_mismatches += int(differs.sum())
            if i == 0 and name == "self_attn.q_proj":
                positions = differs.nonzero().tolist()
                assert positions == [[0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [0, 6]]
                # toward zero: 0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3 (times the scale 2**-4)
                assert (unpacked[0, 1:7] / TIE_SCALE).tolist() == [0.5, 1.5, 3.0, -0.5, -1.5, -3.0]
    assert tie_mismatches == 6


def test_missing_nvfp4_amax_fails_loudly_and_routes_nothing(tiny_llama, tokens):
    model, _ = quantize(tiny_llama, mtq.NVFP4_DEFAULT_CFG, tokens)
    model.model.layers[0].self_attn.q_proj.input_quantizer.reset_amax()
    model.model.layers[1].mlp.up_proj.weight_quantizer.reset_amax()
    with pytest.raises(CalibrationError) as raised, reference_fp4_simulation(model):
        pass
    message = str(raised.value)
    assert message.startswith(
        "FP4 reference simulation: 2 FP4 quantizer(s) cannot be simulated on CPU: "
        "model.layers.0.self_attn.q_proj.input_quantizer: NVFP4 needs a calibrated positive "
        "amax, has None; model.layers.1.mlp.up_proj.weight_quantizer: NVFP4 needs"
    )
    assert "Fix: calibrate with mtq.quantize" in message
    assert all(q.backend is None for q in model.modules() if isinstance(q, TensorQuantizer))


def test_fp8_model_is_left_to_modelopt(tiny_llama, tokens):
    model, _ = quantize(tiny_llama, mtq.FP8_DEFAULT_CFG, tokens)
    with torch.no_grad():
        expected = model(tokens).logits
        with reference_fp4_simulation(model) as report:
            actual = model(tokens).logits
    assert report.applied and report.routed == 0 and report.left_to_modelopt > 0
    assert report.reason == "no NVFP4/MXFP4 quantizer in the model; nothing to route"
    assert torch.equal(actual, expected)


def test_cuda_model_is_a_logged_passthrough(nvfp4_model, monkeypatch, caplog):
    # No GPU here: pretend the model lives on CUDA to check the decision and that nothing changes.
    monkeypatch.setattr(simulate, "_model_on_cuda", lambda model: True)
    with caplog.at_level("INFO", logger="pipeline.quant.simulate"), reference_fp4_simulation(nvfp4_model) as report:
        backends = {q.backend for q in nvfp4_model.modules() if isinstance(q, TensorQuantizer)}
    assert not report.applied and report.routed == 0
    assert backends == {None}
    assert "model is on CUDA: ModelOpt's own FP4 kernels run" in caplog.text


def test_backend_is_unregistered_even_when_the_body_raises(nvfp4_model):
    names = []
    with pytest.raises(KeyError, match="boom"), reference_fp4_simulation(nvfp4_model):
        q = nvfp4_model.model.layers[0].self_attn.q_proj.weight_quantizer
        names.append(q.backend)
        raise KeyError("boom")
    assert names[0].startswith("forge-reference-fp4-")
    assert not is_registered_quant_backend(names[0])
    assert all(q.backend is None for q in nvfp4_model.modules() if isinstance(q, TensorQuantizer))


def test_reused_quantizations_change_nothing_and_follow_in_place_writes(tiny_llama, tokens, monkeypatch):
    # The simulation hands back an earlier output for an unchanged weight and for the input that
    # q/k/v share (simulate._Reuse). Logits must equal those of quantizing every call afresh, and
    # a weight written in place (its version counter moves) must be quantized again.
    model, _ = quantize(tiny_llama, mtq.NVFP4_DEFAULT_CFG, tokens)
    weight = model.model.layers[0].self_attn.q_proj.weight

    def logits_before_and_after_halving():
        with torch.no_grad(), reference_fp4_simulation(model):
            first, second = model(tokens).logits, model(tokens).logits
            weight.mul_(0.5)
            halved = model(tokens).logits
            weight.mul_(2.0)
        return first, second, halved

    first, second, halved = logits_before_and_after_halving()

    class QuantizeEveryCall(simulate._Reuse):
        def __call__(self, inputs, quantizer, quantize):
            return quantize(inputs, quantizer)

    monkeypatch.setattr(simulate, "_Reuse", QuantizeEveryCall)
    expected, _, expected_halved = logits_before_and_after_halving()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert torch.equal(halved, expected_halved)
    assert not torch.equal(halved, expected)
