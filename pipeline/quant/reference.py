"""Pure-PyTorch reference NVFP4 and MXFP4 quantize-dequantize, and unpackers for their exports.

ModelOpt 0.47 runs FP4 fake quantization only through CUDA code (`tensor_quant.py`
`_dynamic_block_quantize_impl` asserts "amax must be a CUDA tensor"), so CPU evaluation of an
FP4-quantized model needs this module. Everything here is plain torch and runs on any device.

What ModelOpt 0.47 does, read from its sources (paths under `modelopt/torch/`):

* E2M1 rounding. The CUDA table converter (`kernels/quantization/gemm/tensor_quant_mx.h`,
  `round_to_even`) and the Triton NVFP4 kernel (`kernels/quantization/common/nvfp4_quant.py`,
  `fp4_round_magnitude`) round to nearest with ties to the grid value whose mantissa bit is 0
  (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4). The NVFP4 export
  (`quantization/qtensor/nvfp4_tensor.py`, `_cast_fp4`) does the same. The MXFP4 export
  (`quantization/qtensor/mxfp4_tensor.py`, `cast_fp4`) counts bounds *strictly* below |x|, so its
  ties go toward zero (0.75->0.5, 1.75->1.5, 3.5->3, ...). `ties="zero"` reproduces that.
* NVFP4 scales. global_scale = global_amax / (6 * 448) in FP32; block scale =
  block_amax / (6 * global_scale) cast to FP8 E4M3 (saturating at 448); the element is divided by
  e4m3_scale * global_scale. The export clamps the block scale to [2**-9, 448] before the cast and
  replaces a zero block scale by 1.0 (`_cast_per_block_scale_to_fp8`, `get_weights_scaling_factor`);
  the Triton fake-quant kernel instead lets the E4M3 cast round tiny scales to zero and then uses 1.0
  wherever the effective scale is below 1e-5 (`fp4_kernel_hopper.py`). The two differ only for
  blocks whose amax is below about 2**-10 * 6 * global_scale, or for tensors whose global amax is
  below about 0.027. `scale_underflow` picks one.
* MXFP4 scales. Both the CUDA kernel (`compute_scale_e8m0_NV`, which `compute_scale` calls) and the
  export use X = 2**ceil(log2(block_amax / 6)), clamped to [-127, 127]. That is *not* the OCP MX v1.0
  rule X = 2**(floor(log2(block_amax)) - 2) (emax of E2M1 is 2); the kernel file has the OCP variant
  (`compute_scale_e8m0_OCP`) but does not call it. The two disagree whenever the block amax lies in
  (6, 8) * 2**k: ModelOpt then uses the larger scale, OCP clips the block maximum to 6 * X.
  `scale_rule` picks one; "modelopt" is the default because it is what ModelOpt quantizes with.
* A last dimension that is not a multiple of the block size: the fake-quant kernels pad each row
  with zeros to whole blocks (`fused_amax_convert`, `pad_dim_to_blocksize`; the Triton kernel loads
  out-of-range columns as zero), so the quantize-dequantize functions here pad and unpad the same
  way. The exporters refuse such weights, so the export unpackers require whole blocks.
* Packing: element 2i goes to the low nibble and element 2i+1 to the high nibble of byte i; a
  nibble is sign << 3 | index into the E2M1 grid (`NVFP4QTensor.quantize`, `fuse_uint4_to_uint8`).

NaN inputs poison their whole block (the block amax becomes NaN); infinities saturate to +-6 x scale.
"""

from __future__ import annotations

from typing import Literal

import torch

Ties = Literal["even", "zero"]
ScaleUnderflow = Literal["clamp", "flush"]
ScaleRule = Literal["modelopt", "ocp"]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring grid values, and for each whether an exact tie goes up under
# round-half-to-even: the tie goes to the neighbour with an even grid index (mantissa bit 0).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_GOES_UP_WHEN_EVEN = (False, True, False, True, False, True, False)
# Smallest positive E4M3 value (subnormal 2**-9), the export's floor for block scales.
_E4M3_MIN_SUBNORMAL = 2.0**-9
# The Triton NVFP4 kernel replaces effective block scales below this by 1.0
# (fp4_kernel_hopper.py: `tl.where(block_max_quant >= 1e-5, block_max_quant, 1.0)`).
_KERNEL_MIN_EFFECTIVE_SCALE = 1e-5
_E8M0_MIN_EXP = -127
_E8M0_MAX_EXP = 127
_E8M0_BIAS = 127


def _check_ties(ties: str) -> None:
    if ties not in ("even", "zero"):
        raise ValueError(f"ties must be 'even' or 'zero', got {ties!r}")


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def e2m1_codes(x: torch.Tensor, ties: Ties = "even") -> torch.Tensor:
    """Encode `x` (already divided by its scale) as E2M1 nibbles: sign << 3 | grid index, uint8.

    Saturates at +-6. Zero and negative zero encode as 0 (no sign bit), as ModelOpt's NVFP4
    export does. NaN encodes as 0; callers that care must mask it (see `round_to_e2m1`).
    """
    _check_ties(ties)
    magnitude = x.abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint, up_when_even in zip(_E2M1_MIDPOINTS, _E2M1_TIE_GOES_UP_WHEN_EVEN, strict=True):
        # Counting the midpoints at or below |x| gives the grid index; whether "at" counts is
        # exactly the tie rule for that midpoint.
        passed = magnitude >= midpoint if (ties == "even" and up_when_even) else magnitude > midpoint
        index += passed.to(torch.uint8)
    sign = (x < 0).to(torch.uint8)
    return (sign << 3) | index


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """Decode E2M1 nibbles (uint8, low 4 bits used) to float32 values."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    magnitude = grid[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def round_to_e2m1(x: torch.Tensor, ties: Ties = "even") -> torch.Tensor:
    """Round to the nearest E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6 with sign), saturating at +-6.

    ties="even": an exact midpoint goes to the neighbour with mantissa bit 0 (ModelOpt's CUDA and
    Triton kernels, NVFP4 export). ties="zero": toward zero (ModelOpt 0.47's MXFP4 export).
    Returns float32; NaN stays NaN.
    """
    # A negative value that rounds to zero comes back as -0.0, as the kernels' `where(x >= 0, q, -q)`.
    if ties == "even":
        return _round_to_e2m1_even(x.float())
    rounded = e2m1_values(e2m1_codes(x, ties))
    return torch.where(torch.isnan(x), x.float(), rounded)


def _round_to_e2m1_even(x: torch.Tensor) -> torch.Tensor:
    """`round_to_e2m1(x, "even")` in five elementwise passes instead of about twenty (the CPU
    evaluation of an FP4 model calls it on every activation; measured 12 ms vs 30 ms on a
    32 x 120 x 576 tensor, 2 cores). The E2M1 grid is uniform within each binade band: step 0.5 below
    2, 1 in [2, 4), 2 from 4, so rounding |x| / step half-to-even (torch.round) and scaling back is
    round-to-nearest-even onto the grid (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4);
    dividing by a power of two is exact, and clamping at 6 saturates. NaN stays NaN through every
    step. tests/unit/test_reference_quant.py checks it bit for bit against the code path."""
    magnitude = x.abs()
    step = (magnitude >= 2.0).to(torch.float32).add_((magnitude >= 4.0).to(torch.float32)).exp2_().mul_(0.5)
    rounded = torch.round(magnitude / step).mul_(step).clamp_(max=E2M1_MAX)
    return torch.where(x < 0, -rounded, rounded)


def _to_blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """View the last dim as (n_blocks, block_size) in float32, zero-padding a partial last block."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension to block along")
    length = x.shape[-1]
    pad = (-length) % block_size
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.reshape(*x.shape[:-1], -1, block_size), length


def _from_blocks(blocks: torch.Tensor, length: int, like: torch.Tensor) -> torch.Tensor:
    flat = blocks.reshape(*blocks.shape[:-2], -1)[..., :length]
    return flat.to(like.dtype)


def nvfp4_global_scale(global_amax: torch.Tensor | float) -> torch.Tensor:
    """FP32 per-tensor scale global_amax / (6 * 448), as ModelOpt's `weight_scale_2`.

    A multi-element amax is reduced to its maximum, as `_dynamic_block_quantize_impl` does.
    """
    amax = torch.as_tensor(global_amax).detach().float()
    if amax.numel() != 1:
        amax = amax.amax()
    amax = amax.reshape(())
    if not bool(torch.isfinite(amax)) or float(amax) <= 0.0:
        raise ValueError(f"global_amax must be positive and finite, got {float(amax)}")
    return amax / (E2M1_MAX * E4M3_MAX)


def nvfp4_block_scales(
    x: torch.Tensor,
    global_amax: torch.Tensor | float,
    block_size: int = 16,
    scale_underflow: ScaleUnderflow = "clamp",
) -> torch.Tensor:
    """Per-block FP8 E4M3 scales (as torch.float8_e4m3fn), shape (*x.shape[:-1], n_blocks).

    scale_underflow="clamp" gives exactly what ModelOpt's NVFP4 export stores as `weight_scale`.
    """
    _check_block_size(block_size)
    blocks, _ = _to_blocks(x, block_size)
    return _nvfp4_block_scales_of(blocks, nvfp4_global_scale(global_amax).to(x.device), scale_underflow)


def _nvfp4_block_scales_of(blocks: torch.Tensor, global_scale: torch.Tensor, scale_underflow: ScaleUnderflow) -> torch.Tensor:
    if scale_underflow not in ("clamp", "flush"):
        raise ValueError(f"scale_underflow must be 'clamp' or 'flush', got {scale_underflow!r}")
    block_amax = blocks.abs().amax(dim=-1)
    raw = block_amax / (E2M1_MAX * global_scale)
    if scale_underflow == "clamp":
        raw = torch.where(raw == 0, torch.ones_like(raw), raw)
        raw = raw.clamp(min=_E4M3_MIN_SUBNORMAL, max=E4M3_MAX)
    else:
        raw = raw.clamp(max=E4M3_MAX)
    # torch's float32 -> float8_e4m3fn cast rounds to nearest even and keeps subnormals
    # (2**-9 .. 2**-6), which is what the CUDA `__nv_fp8_e4m3` and Triton casts do.
    return raw.to(torch.float8_e4m3fn)


def nvfp4_quantize_dequantize(
    x: torch.Tensor,
    global_amax: torch.Tensor | float,
    block_size: int = 16,
    ties: Ties = "even",
    scale_underflow: ScaleUnderflow = "clamp",
) -> torch.Tensor:
    """NVFP4 fake quantization of `x` along its last dim; returns a tensor of x's shape and dtype.

    Blocks of `block_size` share one E4M3 scale; the tensor shares the FP32 scale
    global_amax / 2688. scale_underflow="clamp" matches ModelOpt's export bit for bit;
    "flush" matches its Triton fake-quant kernel (see the module docstring).
    """
    _check_ties(ties)
    _check_block_size(block_size)
    global_scale = nvfp4_global_scale(global_amax).to(x.device)
    blocks, length = _to_blocks(x, block_size)
    scale = _nvfp4_block_scales_of(blocks, global_scale, scale_underflow).float() * global_scale
    if scale_underflow == "flush":
        scale = torch.where(scale >= _KERNEL_MIN_EFFECTIVE_SCALE, scale, torch.ones_like(scale))
    scale = scale.unsqueeze(-1)
    dequantized = round_to_e2m1(blocks / scale, ties) * scale
    return _from_blocks(dequantized, length, x)


def mxfp4_scale_exponents(x: torch.Tensor, block_size: int = 32, scale_rule: ScaleRule = "modelopt") -> torch.Tensor:
    """Per-block E8M0 exponents (int32, in [-127, 127]), shape (*x.shape[:-1], n_blocks).

    scale_rule="modelopt": ceil(log2(amax / 6)), computed exactly from the FP32 quotient's bits as
    `compute_scale_e8m0_NV` does. "ocp": floor(log2(amax)) - 2 (OCP MX v1.0, E2M1 emax = 2).
    An all-zero block gets -127 (what ModelOpt's export writes: E8M0 byte 0); its output is zero
    under any scale. A non-finite amax gets exponent 0, as the CUDA kernel's `compute_scale`.
    """
    _check_block_size(block_size)
    if scale_rule not in ("modelopt", "ocp"):
        raise ValueError(f"scale_rule must be 'modelopt' or 'ocp', got {scale_rule!r}")
    blocks, _ = _to_blocks(x, block_size)
    block_amax = blocks.abs().amax(dim=-1)
    if scale_rule == "modelopt":
        # frexp: v = m * 2**e with m in [0.5, 1); log2(v) is an integer exactly when m == 0.5.
        mantissa, exponent = torch.frexp(block_amax / E2M1_MAX)
        exponents = torch.where(mantissa == 0.5, exponent - 1, exponent)
    else:
        mantissa, exponent = torch.frexp(block_amax)
        exponents = (exponent - 1) - 2
    exponents = torch.where(block_amax == 0, torch.full_like(exponents, _E8M0_MIN_EXP), exponents)
    exponents = torch.where(torch.isfinite(block_amax), exponents, torch.zeros_like(exponents))
    return exponents.clamp(_E8M0_MIN_EXP, _E8M0_MAX_EXP).to(torch.int32)


def mxfp4_quantize_dequantize(
    x: torch.Tensor,
    block_size: int = 32,
    ties: Ties = "even",
    scale_rule: ScaleRule = "modelopt",
) -> torch.Tensor:
    """MXFP4 fake quantization of `x` along its last dim; returns a tensor of x's shape and dtype.

    Each block of `block_size` shares a power-of-two scale X (see `mxfp4_scale_exponents`);
    elements become round_e2m1(x / X) * X, saturating at +-6 X. ties="even" matches ModelOpt's CUDA
    kernel, ties="zero" its export.
    """
    _check_ties(ties)
    exponents = mxfp4_scale_exponents(x, block_size, scale_rule)
    # 2**-127 is an FP32 subnormal, so ldexp is exact over the whole E8M0 range used here.
    scale = torch.ldexp(torch.ones_like(exponents, dtype=torch.float32), exponents).unsqueeze(-1)
    blocks, length = _to_blocks(x, block_size)
    dequantized = round_to_e2m1(blocks / scale, ties) * scale
    return _from_blocks(dequantized, length, x)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack E2M1 nibbles pairwise along the last dim (element 2i low, 2i+1 high), as ModelOpt."""
    if codes.shape[-1] % 2:
        raise ValueError(f"last dim must be even to pack nibbles, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: uint8 (..., n/2) -> nibbles uint8 (..., n)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed FP4 data must be uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)


def _export_blocks(
    packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...] | torch.Size, what: str
) -> tuple[torch.Tensor, int]:
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % 2:
        raise ValueError(f"{what}: shape {shape} must have an even last dim")
    if tuple(packed.shape) != (*shape[:-1], shape[-1] // 2):
        raise ValueError(
            f"{what}: packed data has shape {tuple(packed.shape)}, expected "
            f"{(*shape[:-1], shape[-1] // 2)} for a tensor of shape {shape}"
        )
    n_blocks = scales.shape[-1] if scales.dim() else 0
    if tuple(scales.shape[:-1]) != shape[:-1] or n_blocks == 0 or shape[-1] % n_blocks:
        raise ValueError(
            f"{what}: scales of shape {tuple(scales.shape)} do not tile a tensor of shape {shape} "
            "into whole blocks along the last dim"
        )
    block_size = shape[-1] // n_blocks
    values = e2m1_values(unpack_fp4(packed))
    return values.reshape(*shape[:-1], n_blocks, block_size), block_size


def dequantize_nvfp4_export(
    packed_uint8: torch.Tensor,
    block_scales_e4m3: torch.Tensor,
    global_scale_fp32: torch.Tensor | float,
    shape: tuple[int, ...] | torch.Size,
) -> torch.Tensor:
    """Float32 values of an exported NVFP4 tensor: `weight` (U8), `weight_scale` (F8_E4M3), `weight_scale_2` (F32).

    The block size is shape[-1] / block_scales.shape[-1] (16 for NVFP4_DEFAULT_CFG).
    """
    if block_scales_e4m3.dtype != torch.float8_e4m3fn:
        raise ValueError(f"NVFP4 block scales must be float8_e4m3fn, got {block_scales_e4m3.dtype}")
    values, _ = _export_blocks(packed_uint8, block_scales_e4m3, shape, "NVFP4 export")
    global_scale = torch.as_tensor(global_scale_fp32).float().reshape(()).to(values.device)
    scale = (block_scales_e4m3.float() * global_scale).unsqueeze(-1)
    return (values * scale).reshape(tuple(shape))


def dequantize_mxfp4_export(
    packed_uint8: torch.Tensor,
    scales_e8m0_uint8: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
) -> torch.Tensor:
    """Float32 values of an exported MXFP4 tensor: `weight` (U8 nibbles) and `weight_scale` (U8 E8M0).

    E8M0 byte b means 2**(b - 127); b = 255 is NaN (OCP MX v1.0 table 7).
    """
    if scales_e8m0_uint8.dtype != torch.uint8:
        raise ValueError(f"MXFP4 scales must be uint8 (E8M0), got {scales_e8m0_uint8.dtype}")
    values, _ = _export_blocks(packed_uint8, scales_e8m0_uint8, shape, "MXFP4 export")
    exponents = scales_e8m0_uint8.to(torch.int32) - _E8M0_BIAS
    scale = torch.ldexp(torch.ones_like(exponents, dtype=torch.float32), exponents)
    scale = torch.where(scales_e8m0_uint8 == 255, torch.full_like(scale, float("nan")), scale)
    return (values * scale.unsqueeze(-1)).reshape(tuple(shape))
