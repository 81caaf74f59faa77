"""The CPU reference against ModelOpt 0.47's CUDA FP4 fake quantization (needs a GPU).

Skips by compute capability, not GPU name: ModelOpt loads its Triton NVFP4 fake-quant kernel only
when `torch.cuda.get_device_capability() >= (8, 9)` (modelopt/torch/kernels/quantization/gemm/
__init__.py; the kernel uses tl.float8e4nv); below that it takes another CUDA path whose scale
arithmetic differs. MXFP4 also needs ModelOpt's JIT-built MX extension (nvcc on the machine).

Tolerance: Triton's fp32 division and the MX extension's --use_fast_math division may be off by
an ulp, which moves a value sitting exactly on a rounding midpoint (or a block amax sitting exactly
on a power-of-two boundary) by one step. So a few elements may differ by one E2M1 step of their
block; anything else fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import random_tiny_llama

from pipeline.core.formats import FORMATS as FORMAT_REGISTRY
from pipeline.quant.reference import (
    mxfp4_quantize_dequantize,
    mxfp4_scale_exponents,
    nvfp4_block_scales,
    nvfp4_global_scale,
    nvfp4_quantize_dequantize,
)
from pipeline.quant.simulate import reference_fp4_simulation

MIN_CAPABILITY = (8, 9)
MAX_MISMATCH_FRACTION = 1e-3

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < MIN_CAPABILITY,
    reason=f"needs CUDA with compute capability >= {MIN_CAPABILITY} for ModelOpt's FP4 kernels",
)

# Block size and scale encoding from the format registry; (exponent, mantissa) bits of each scale
# encoding as ModelOpt's num_bits spells them.
SCALE_BITS = {"e4m3": (4, 3), "e8m0": (8, 0)}
FORMATS = {name: (FORMAT_REGISTRY[name].block_size, SCALE_BITS[FORMAT_REGISTRY[name].scale_type.split()[0]])
           for name in ("nvfp4", "mxfp4")}


def needs_mx_extension(fmt: str) -> None:
    if fmt != "mxfp4":
        return
    from modelopt.torch.quantization.extensions import get_cuda_ext_mx

    if get_cuda_ext_mx(raise_if_failed=False) is None:
        pytest.skip("ModelOpt's MX CUDA extension could not be built (nvcc missing?)")


def modelopt_quantizer(fmt: str, amax):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    block, scale_bits = FORMATS[fmt]
    quantizer = TensorQuantizer(
        QuantizerAttributeConfig(num_bits=(2, 1), block_sizes={-1: block, "type": "dynamic", "scale_bits": scale_bits})
    )
    if amax is not None:
        quantizer.amax = amax
    return quantizer.cuda()


def element_scales(fmt: str, x: torch.Tensor, amax) -> torch.Tensor:
    """Each element's effective block scale under the reference (one E2M1 step is <= 2 of them)."""
    block, _ = FORMATS[fmt]
    if fmt == "nvfp4":
        scales = nvfp4_block_scales(x, amax, block, "flush").float() * nvfp4_global_scale(amax)
    else:
        exponents = mxfp4_scale_exponents(x, block)
        scales = torch.ldexp(torch.ones_like(exponents, dtype=torch.float32), exponents)
    return scales.repeat_interleave(block, dim=-1)[..., : x.shape[-1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_reference_matches_modelopt_cuda_fake_quant(fmt, dtype):
    needs_mx_extension(fmt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1000, generator=gen) * torch.exp(3 * torch.randn(512, 1, generator=gen))
    x[0, :32] = 0.0
    x = x.to(dtype)  # 1000 columns: the last block of each row is partial (1000 % 16 == 8)
    amax = x.float().abs().amax() if fmt == "nvfp4" else None
    with torch.no_grad():
        theirs = modelopt_quantizer(fmt, amax)(x.cuda()).cpu().float()
    if fmt == "nvfp4":
        ours = nvfp4_quantize_dequantize(x, amax, 16, scale_underflow="flush").float()
    else:
        ours = mxfp4_quantize_dequantize(x, 32).float()
    diff = (theirs - ours).abs()
    differs = diff > 0
    print(
        f"{fmt}/{dtype}: max abs err {float(diff.max()):.3e}, mean {float(diff.mean()):.3e}, "
        f"{int(differs.sum())} of {x.numel()} elements differ"
    )
    assert int(differs.sum()) <= MAX_MISMATCH_FRACTION * x.numel()
    step_bound = 2 * element_scales(fmt, x, amax)
    assert bool((diff <= step_bound).all())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_simulated_tiny_llama_matches_modelopt_on_cuda(fmt):
    needs_mx_extension(fmt)
    mtq = pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("transformers")
    model = random_tiny_llama(num_key_value_heads=4, max_position_embeddings=64).cuda()
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG if fmt == "nvfp4" else mtq.MXFP4_DEFAULT_CFG)

    def forward_loop(m):
        with torch.no_grad():
            m(tokens.cuda())

    mtq.quantize(model, cfg, forward_loop)
    with torch.no_grad():
        with reference_fp4_simulation(model) as passthrough:
            gpu_logits = model(tokens.cuda()).logits.float().cpu()
        cpu_model = copy.deepcopy(model).cpu()
        with reference_fp4_simulation(cpu_model) as report:
            cpu_logits = cpu_model(tokens).logits.float()
    assert not passthrough.applied
    assert report.routed_by_kind()[fmt] == 32
    max_err = float((gpu_logits - cpu_logits).abs().max())
    scale = float(gpu_logits.std())
    print(f"{fmt} tiny Llama logits: max abs err {max_err:.3e}, logits std {scale:.3e}")
    # Matmul order differs between cuBLAS and CPU, so activations can land on the other side of
    # a rounding boundary now and then; the logits must still agree to a few percent of their std.
    assert max_err <= 0.05 * scale
