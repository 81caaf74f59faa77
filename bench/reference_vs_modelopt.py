"""Compare the pure-PyTorch FP4 reference with ModelOpt's CUDA fake quantization; print JSON.

Run on a GPU machine from the repository root:

    PYTHONPATH=. python bench/reference_vs_modelopt.py [--seed 0] [--rows 1024] [--cols 4096]

It needs CUDA with compute capability >= 8.9: below that ModelOpt 0.47 does not load its Triton
NVFP4 kernel (modelopt/torch/kernels/quantization/gemm/__init__.py imports fp4_kernel_hopper only
for `get_device_capability() >= (8, 9)`, it uses tl.float8e4nv) and falls back to a different
CUDA path. MXFP4 also needs ModelOpt's JIT-built MX extension (nvcc); without it MXFP4 is
reported as skipped. Exit code 2 when no suitable GPU is present.

For each format and input dtype it quantizes the same random tensors with ModelOpt (a
TensorQuantizer on CUDA) and with the reference on CPU, and reports max/mean abs error and the
number of elements and blocks that differ; then it does the same for the logits of a tiny random
Llama quantized by ModelOpt on CUDA and evaluated on CPU under `reference_fp4_simulation`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from pipeline.quant.reference import mxfp4_quantize_dequantize, nvfp4_quantize_dequantize
from pipeline.quant.simulate import reference_fp4_simulation

MIN_CAPABILITY = (8, 9)
FORMATS = {
    "nvfp4": {"block": 16, "scale_bits": (4, 3)},
    "mxfp4": {"block": 32, "scale_bits": (8, 0)},
}


def modelopt_quantizer(fmt: str, amax: torch.Tensor | None):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    spec = FORMATS[fmt]
    quantizer = TensorQuantizer(
        QuantizerAttributeConfig(
            num_bits=(2, 1),
            block_sizes={-1: spec["block"], "type": "dynamic", "scale_bits": spec["scale_bits"]},
        )
    )
    if amax is not None:
        quantizer.amax = amax
    return quantizer


def reference(fmt: str, x: torch.Tensor, amax: torch.Tensor | None) -> torch.Tensor:
    # "flush" and ties to even are the semantics of ModelOpt's GPU fake-quant kernels.
    if fmt == "nvfp4":
        return nvfp4_quantize_dequantize(x, amax, 16, ties="even", scale_underflow="flush")
    return mxfp4_quantize_dequantize(x, 32, ties="even")


def compare(actual: torch.Tensor, expected: torch.Tensor, block: int) -> dict:
    actual, expected = actual.float().cpu(), expected.float().cpu()
    diff = (actual - expected).abs()
    differs = actual != expected
    cols = actual.shape[-1]
    padded = torch.nn.functional.pad(differs.reshape(-1, cols), (0, (-cols) % block))
    return {
        "numel": actual.numel(),
        "max_abs_err": float(diff.max()),
        "mean_abs_err": float(diff.mean()),
        "max_abs_value": float(expected.abs().max()),
        "mismatched_elements": int(differs.sum()),
        "mismatched_blocks": int(padded.reshape(-1, block).any(dim=-1).sum()),
    }


def tensor_comparison(fmt: str, dtype: torch.dtype, rows: int, cols: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    # Row magnitudes spread over ~6 orders of magnitude so that tiny and saturating scales occur.
    x = torch.randn(rows, cols, generator=gen) * torch.exp(3 * torch.randn(rows, 1, generator=gen))
    x[0, : FORMATS[fmt]["block"]] = 0.0
    x = x.to(dtype)
    amax = x.float().abs().amax() if fmt == "nvfp4" else None
    quantizer = modelopt_quantizer(fmt, amax).cuda()
    with torch.no_grad():
        ours = reference(fmt, x, amax)
        theirs = quantizer(x.cuda())
    return compare(theirs, ours, FORMATS[fmt]["block"])


def tiny_llama_comparison(fmt: str, seed: int) -> dict:
    import modelopt.torch.quantization as mtq
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval().cuda()
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(seed))
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG if fmt == "nvfp4" else mtq.MXFP4_DEFAULT_CFG)

    def forward_loop(m):
        with torch.no_grad():
            m(tokens.cuda())

    mtq.quantize(model, cfg, forward_loop)
    with torch.no_grad():
        gpu_logits = model(tokens.cuda()).logits.float().cpu()
        cpu_model = copy.deepcopy(model).cpu()
        with reference_fp4_simulation(cpu_model) as report:
            cpu_logits = cpu_model(tokens).logits.float()
    result = compare(gpu_logits, cpu_logits, 1)
    result.pop("mismatched_blocks")
    result["routed"] = report.routed_by_kind()
    result["logits_std"] = float(gpu_logits.std())
    return result


def mx_extension_available() -> bool:
    from modelopt.torch.quantization.extensions import get_cuda_ext_mx

    return get_cuda_ext_mx(raise_if_failed=False) is not None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("reference_vs_modelopt: needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        print(
            f"reference_vs_modelopt: compute capability {capability} is below {MIN_CAPABILITY}, "
            "where ModelOpt uses its Triton NVFP4 kernel",
            file=sys.stderr,
        )
        return 2
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "capability": list(capability),
        "torch": torch.__version__,
        "tensors": {},
        "tiny_llama": {},
    }
    formats = ["nvfp4"] + (["mxfp4"] if mx_extension_available() else [])
    if "mxfp4" not in formats:
        results["skipped"] = {"mxfp4": "ModelOpt's MX CUDA extension could not be built"}
    for fmt in formats:
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{fmt}/{str(dtype).removeprefix('torch.')}"
            results["tensors"][key] = tensor_comparison(fmt, dtype, args.rows, args.cols, args.seed)
        results["tiny_llama"][fmt] = tiny_llama_comparison(fmt, args.seed)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
