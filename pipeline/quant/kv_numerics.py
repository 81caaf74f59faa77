"""The FP8 KV cache as each engine computes it, for a ModelOpt FP8-KV model evaluated on any device.

ModelOpt's FP8 KV fake quant (the `[kv]_bmm_quantizer`s on post-RoPE K and V) scales each tensor by
its calibrated amax / 448 and rounds to nearest (a float8_e4m3fn cast). The engines differ:
- the unified HF export writes k_scale / v_scale = amax / 448 (modelopt/torch/export/unified_export_hf.py
  "kv cache scale as amax / 448", quant_utils.py postprocess_state_dict; measured on the fp8 recipe:
  0.0013-0.053). vLLM uses those scales (vllm/model_executor/layers/quantization/kv_cache.py,
  BaseKVCacheMethod.process_weights_after_loading), and its CPU build stores E4M3 by bit truncation,
  i.e. rounds toward zero, after clamping to +-448 (csrc/cpu/cpu_attn_fp8.hpp float_to_fp8e4m3_scalar:
  `v * 0x1p-120f`, keep the top bits, no rounding step); "fp8" means E4M3 there;
- TensorRT-LLM 1.2's PyTorch backend ignores FP8 KV scales (they stay 1.0; _torch/modules/linear.py) and converts
  with CUDA's round-to-nearest, saturating conversion: with scale 1.0, entries below E4M3's smallest
  normal (2**-6) fall into subnormals, and below 2**-10 to zero.
Truncation shrinks every entry by half a unit in the last place on average (E4M3 has 3 mantissa
bits: up to 12.5%), a bias rounding to nearest does not have.

`engine_kv_numerics` routes the model's K/V quantizers through a registered quant backend that
computes one engine's numerics (the mechanism is pipeline/quant/simulate.py's: `quantizer.backend`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.core.errors import CalibrationError
from pipeline.quant.simulate import FORGE_BACKEND_PREFIX, builds_graph

logger = logging.getLogger(__name__)

KvNumericsName = Literal["modelopt", "vllm-cpu", "trtllm"]
KV_NUMERICS: dict[str, tuple[str, str]] = {
    # name: (which scale, rounding)
    "modelopt": ("calibrated", "nearest"),  # ModelOpt's own fake quant, unchanged
    "vllm-cpu": ("exported", "toward_zero"),
    "trtllm": ("one", "nearest"),
}
_E4M3_MAX = 448.0


def e4m3_round_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """E4M3 values of float32 `x` (already clamped to +-448) truncated toward zero. Scaling by 2**-120
    moves E4M3's exponent range onto float32's lowest binades (subnormals included), where keeping
    the sign, exponent and top 3 mantissa bits is E4M3 truncation, as vLLM's CPU kernel does."""
    shifted = (x.float() * 2.0**-120).contiguous()
    kept = shifted.view(torch.int32) & torch.tensor(-(1 << 20), dtype=torch.int32)  # 0xFFF00000
    return kept.view(torch.float32) * 2.0**120


def fp8_kv_quantize_dequantize(x: torch.Tensor, scale: float, rounding: str) -> torch.Tensor:
    scaled = (x.float() / scale).clamp(-_E4M3_MAX, _E4M3_MAX)
    if rounding == "toward_zero":
        q = e4m3_round_toward_zero(scaled)
    else:
        q = scaled.to(torch.float8_e4m3fn).float()
    return (q * scale).to(x.dtype)


@dataclass(frozen=True)
class KvNumericsReport:
    numerics: str
    scale: str
    rounding: str
    routed: int  # K/V quantizers now computing the engine's numerics
    scales: dict[str, float]  # "<attention module>.k" / ".v" -> the scale used

    def to_dict(self) -> dict[str, Any]:
        return {"numerics": self.numerics, "scale": self.scale, "rounding": self.rounding, "routed": self.routed,
                "scale_min": min(self.scales.values(), default=None), "scale_max": max(self.scales.values(), default=None)}


def _kv_attention_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    found = []
    for name, module in model.named_modules():
        k, v = getattr(module, "k_bmm_quantizer", None), getattr(module, "v_bmm_quantizer", None)
        if k is None or v is None or not (k.is_enabled and v.is_enabled):
            continue
        if tuple(k.num_bits) != (4, 3) or tuple(v.num_bits) != (4, 3) or k.axis is not None or v.axis is not None:
            raise CalibrationError(_WHERE_KV, f"{name}: K/V quantizers are not per-tensor FP8 E4M3 "
                                   f"(num_bits {k.num_bits}/{v.num_bits}, axis {k.axis}/{v.axis}).",
                                   "use ModelOpt's FP8_KV_CFG for the KV cache.")
        found.append((name, module))
    return found


_WHERE_KV = "engine KV-cache numerics"


def _kv_scales(attention: Any, scale: str) -> tuple[float, float]:
    if scale == "one":
        return 1.0, 1.0
    # "exported" and "calibrated" are the same number: the unified export writes amax / 448.
    return (float(attention.k_bmm_quantizer.amax.float().max()) / _E4M3_MAX,
            float(attention.v_bmm_quantizer.amax.float().max()) / _E4M3_MAX)


@contextmanager
def engine_kv_numerics(model: torch.nn.Module, numerics: str) -> Iterator[KvNumericsReport]:
    """Make a ModelOpt FP8-KV model's K/V fake quant compute what engine `numerics` computes
    ("vllm-cpu", "trtllm"); "modelopt" (or a model without an FP8 KV cache) changes nothing.
    Restores every quantizer's backend on exit."""
    if numerics not in KV_NUMERICS:
        raise CalibrationError(_WHERE_KV, f"unknown KV numerics {numerics!r}.", f"use one of {', '.join(KV_NUMERICS)}.")
    scale_kind, rounding = KV_NUMERICS[numerics]
    attentions = _kv_attention_modules(model) if numerics != "modelopt" else []
    if not attentions:
        yield KvNumericsReport(numerics, scale_kind, rounding, 0, {})
        return
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        register_quant_backend,
        unregister_quant_backend,
    )

    scales: dict[str, float] = {}
    by_quantizer: dict[int, float] = {}
    for name, attention in attentions:
        k_scale, v_scale = _kv_scales(attention, scale_kind)
        scales[f"{name}.k"], scales[f"{name}.v"] = k_scale, v_scale
        by_quantizer[id(attention.k_bmm_quantizer)] = k_scale
        by_quantizer[id(attention.v_bmm_quantizer)] = v_scale

    def backend(inputs: torch.Tensor, quantizer: Any) -> torch.Tensor:
        outputs = fp8_kv_quantize_dequantize(inputs, by_quantizer[id(quantizer)], rounding)
        return inputs + (outputs - inputs).detach() if builds_graph(inputs) else outputs

    backend_name = f"{FORGE_BACKEND_PREFIX}kv-{numerics}-{uuid.uuid4().hex}"
    register_quant_backend(backend_name, backend)
    quantizers = [q for _, a in attentions for q in (a.k_bmm_quantizer, a.v_bmm_quantizer)]
    previous = [(q, q.backend) for q in quantizers]
    logger.info("KV cache: %d K/V quantizers compute %s numerics (scale %s, rounding %s)", len(quantizers),
                numerics, scale_kind, rounding)
    try:
        for q in quantizers:
            q.backend = backend_name
        yield KvNumericsReport(numerics, scale_kind, rounding, len(quantizers), scales)
    finally:
        for q, b in previous:
            q.backend = b
        unregister_quant_backend(backend_name)
