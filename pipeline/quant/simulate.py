"""Run a ModelOpt FP4-quantized model on CPU by routing its FP4 quantizers through the reference.

ModelOpt 0.47 fake-quantizes NVFP4 and MXFP4 only with CUDA code: on CPU the forward pass fails
with "amax must be a CUDA tensor for dynamic block quantization" (NVFP4) or "Skipping extension
modelopt_cuda_ext_mx because CUDA is not available" (MXFP4). Calibration itself is not affected:
measured on a tiny Llama on CPU, `mtq.quantize` with NVFP4_DEFAULT_CFG (max calibration) collects
every amax without running a fake-quant forward, and MXFP4_DEFAULT_CFG (`algorithm: None`) never
calls the forward loop. So this context manager is needed around evaluation, not around
calibration; entered before `mtq.quantize` it finds no quantizers and changes nothing.

How it routes: ModelOpt's `TensorQuantizer._fake_quantize` hands the tensor to a registered
"quant backend" when `quantizer.backend` names one (`register_quant_backend`, tensor_quantizer.py).
Inside the context every FP4 quantizer's `backend` names a backend registered under a name unique
to this context; on exit each `backend` gets back its previous value and the backend is
unregistered, so `export_hf_checkpoint` afterwards sees the quantizers exactly as before. Everything
the quantizer does around `_fake_quantize` (enable state, pre-quant scale, rotation) still runs.
FP8 and other quantizers keep ModelOpt's own code, which runs on CPU.

On CUDA the context does nothing: ModelOpt's kernels run there and are the thing to trust.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.errors import CalibrationError
from pipeline.quant.reference import mxfp4_quantize_dequantize, nvfp4_quantize_dequantize

logger = logging.getLogger(__name__)

Semantics = Literal["fake_quant", "export"]
# Every quant backend forge registers is named with this prefix and a fresh uuid (one per process
# and context); modelopt_glue.save_quant_state drops such names from what it saves.
FORGE_BACKEND_PREFIX = "forge-"
_WHERE = "FP4 reference simulation"
# block_sizes keys the reference understands; anything else (e.g. "four_over_six") changes the
# numerics in ways the reference does not implement.
_KNOWN_BLOCK_KEYS = {-1, "type", "scale_bits"}


@dataclass(frozen=True)
class SimulationReport:
    """What `reference_fp4_simulation` did to a model."""

    applied: bool  # False when the model is on CUDA and ModelOpt's kernels run instead
    reason: str
    semantics: str
    nvfp4_routed: int  # NVFP4 quantizers (E2M1 + E4M3 block scales) now running the reference
    mxfp4_routed: int  # MXFP4 quantizers (E2M1 + E8M0 block scales) now running the reference
    disabled_routed: int  # of the routed ones, how many are disabled (they pass tensors through)
    left_to_modelopt: int  # non-FP4 quantizers (FP8, ...), untouched

    @property
    def routed(self) -> int:
        return self.nvfp4_routed + self.mxfp4_routed

    def routed_by_kind(self) -> dict[str, int]:
        return {"nvfp4": self.nvfp4_routed, "mxfp4": self.mxfp4_routed}


@dataclass(frozen=True)
class _Fp4Quantizer:
    name: str
    module: Any  # modelopt TensorQuantizer
    kind: str  # "nvfp4" | "mxfp4"


def _fp4_kind(quantizer: Any) -> str | None:
    """'nvfp4' / 'mxfp4' for an E2M1 dynamic-block quantizer, 'fp4-other' for other E2M1, else None."""
    num_bits = quantizer.num_bits
    if not isinstance(num_bits, tuple) or tuple(num_bits) != (2, 1):
        return None
    block_sizes = quantizer.block_sizes or {}
    if block_sizes.get("type") != "dynamic":
        return "fp4-other"
    scale_bits = tuple(block_sizes.get("scale_bits") or ())
    if scale_bits == (4, 3):
        return "nvfp4"
    if scale_bits == (8, 0):
        return "mxfp4"
    return "fp4-other"


def _unsupported_reason(quantizer: Any, kind: str) -> str | None:
    if kind == "fp4-other":
        return (
            f"E2M1 quantizer with block_sizes={quantizer.block_sizes} (only dynamic blocks with "
            "E4M3 or E8M0 scales, as in NVFP4_DEFAULT_CFG / MXFP4_DEFAULT_CFG, are simulated)"
        )
    block_sizes = quantizer.block_sizes
    extra = {k: v for k, v in block_sizes.items() if k not in _KNOWN_BLOCK_KEYS and v}
    if extra or not isinstance(block_sizes.get(-1), int):
        return f"block_sizes={block_sizes} (the reference blocks along the last dim only)"
    if not quantizer.fake_quant:
        return "real (not fake) quantization"
    if quantizer.bias is not None:
        return f"quantization bias {quantizer.bias}"
    return None


def _usable_amax(quantizer: Any) -> bool:
    amax = quantizer.amax
    if amax is None:
        return False
    amax = amax.detach().float()
    return bool(torch.isfinite(amax).all()) and float(amax.amax()) > 0.0


def _model_on_cuda(model: torch.nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return any(t.is_cuda for t in tensors)


def _make_backend(names: dict[int, str], semantics: Semantics,
                  amax_from_input: bool = False) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The entrypoint ModelOpt calls instead of its CUDA fake quant, for every routed quantizer.

    `amax_from_input` (calibration algorithms only): a quantizer without a calibrated amax uses
    ModelOpt's own fallback, `TensorQuantizer._get_amax(inputs)` (the tensor's max, computed per
    call; tensor_quantizer.py, 0.47), as AWQ's and auto_quantize's searches expect."""
    # "fake_quant" reproduces ModelOpt's GPU kernels (ties to even; tiny NVFP4 block scales as the
    # Triton kernel); "export" reproduces the checkpoint export (NVFP4 scale floor 2**-9; MXFP4
    # ties toward zero). See pipeline/quant/reference.py for the sources.
    mxfp4_ties = "even" if semantics == "fake_quant" else "zero"
    underflow = "flush" if semantics == "fake_quant" else "clamp"
    # Evaluation only (the searches change amaxes and weights between calls): see _Reuse.
    reuse = None if amax_from_input else _Reuse()

    def backend(inputs: torch.Tensor, quantizer: Any) -> torch.Tensor:
        if reuse is None or _builds_graph(inputs):
            return quantize(inputs, quantizer)
        return reuse(inputs, quantizer, quantize)

    def quantize(inputs: torch.Tensor, quantizer: Any) -> torch.Tensor:
        kind = _fp4_kind(quantizer)
        block_size = quantizer.block_sizes[-1]
        if kind == "nvfp4":
            amax = quantizer.amax
            if amax is None and amax_from_input:
                amax = quantizer._get_amax(inputs)
            if amax is None:
                raise CalibrationError(
                    _WHERE,
                    f"NVFP4 quantizer {names.get(id(quantizer), '?')} was enabled without a calibrated amax.",
                    "calibrate it with mtq.quantize before enabling it.",
                )
            outputs = nvfp4_quantize_dequantize(inputs, amax, block_size, ties="even", scale_underflow=underflow)
        elif kind == "mxfp4":
            outputs = mxfp4_quantize_dequantize(inputs, block_size, ties=mxfp4_ties, scale_rule="modelopt")
        else:
            raise CalibrationError(
                _WHERE,
                f"quantizer {names.get(id(quantizer), '?')} changed to num_bits="
                f"{quantizer.num_bits}, block_sizes={quantizer.block_sizes} inside the simulation.",
                "change quantizer settings before entering reference_fp4_simulation.",
            )
        if _builds_graph(inputs):
            # Straight-through gradient, as ModelOpt's dynamic block quant (pass_through_bwd).
            return inputs + (outputs - inputs).detach()
        return outputs

    return backend


def _builds_graph(inputs: torch.Tensor) -> bool:
    """Autograd records this call. Not under torch.no_grad (evaluation), even for a weight, whose
    requires_grad stays True: there the quantized values go out as they are, as ModelOpt's kernels
    return them, not re-derived as `w + (q - w)`, which float rounding can move off the FP4 grid."""
    return inputs.requires_grad and torch.is_grad_enabled()


class _Reuse:
    """Hands back an earlier fake-quant output when the same quantizer settings meet the same tensor.

    Scoring an FP4 model on CPU spends most of its time in the reference quantizers, and much of
    that work repeats: every forward pass re-quantizes each unchanged weight, and q/k/v (gate/up)
    quantize one shared input with one amax (modelopt_glue.calibrate gives each fused group its
    largest amax). "The same tensor" is identity plus torch's version counter, which every in-place
    write bumps, so a reused output is exactly what quantizing again would give; the held reference
    keeps the tensor's memory from being reused under a stale key. Measured on the nvfp4 recipe of
    the embedded default (a 32 x 60 batch, 2 cores): 8.8 s -> 4.8 s per forward, logits bit-identical.
    - weights (nn.Parameter inputs): one entry per quantizer, kept for the whole context;
    - activations: the last call only, which is what the shared q/k/v and gate/up inputs hit.
    """

    def __init__(self) -> None:
        # (input, its version, quantizer settings, output, the output's version)
        self.weights: dict[int, tuple[torch.Tensor, int, tuple, torch.Tensor, int]] = {}
        self.last: tuple[torch.Tensor, int, tuple, torch.Tensor, int] | None = None

    @staticmethod
    def _settings(quantizer: Any) -> tuple:
        amax = quantizer.amax
        amax_key = None if amax is None else (amax.detach().float().cpu().numpy().tobytes(), tuple(amax.shape))
        return (_fp4_kind(quantizer), quantizer.block_sizes[-1], amax_key)

    def __call__(self, inputs: torch.Tensor, quantizer: Any,
                 quantize: Callable[[torch.Tensor, Any], torch.Tensor]) -> torch.Tensor:
        settings = self._settings(quantizer)
        is_weight = isinstance(inputs, torch.nn.Parameter)
        entry = self.weights.get(id(quantizer)) if is_weight else self.last
        if (entry is not None and entry[0] is inputs and entry[1] == inputs._version and entry[2] == settings
                and entry[4] == entry[3]._version):  # nobody wrote into the output handed out before
            return entry[3]
        outputs = quantize(inputs, quantizer)
        stored = (inputs, inputs._version, settings, outputs, outputs._version)
        if is_weight:
            self.weights[id(quantizer)] = stored
        else:
            self.last = stored
        return outputs


def _collect(model: torch.nn.Module, need_amax: bool = True) -> tuple[list[_Fp4Quantizer], int, list[str]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    routed: list[_Fp4Quantizer] = []
    others = 0
    problems: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer):
            continue
        kind = _fp4_kind(module)
        if kind is None:
            others += 1
            continue
        if not module.is_enabled:
            if kind in ("nvfp4", "mxfp4") and module.backend is None and _unsupported_reason(module, kind) is None:
                routed.append(_Fp4Quantizer(name, module, kind))
            continue
        reason = _unsupported_reason(module, kind)
        if reason is not None:
            problems.append(f"{name}: unsupported {reason}")
        elif module.backend is not None:
            problems.append(f"{name}: already uses custom quant backend {module.backend!r}")
        elif kind == "nvfp4" and need_amax and not _usable_amax(module):
            problems.append(f"{name}: NVFP4 needs a calibrated positive amax, has {module.amax}")
        else:
            routed.append(_Fp4Quantizer(name, module, kind))
    return routed, others, problems


@contextmanager
def reference_fp4_simulation(
    model: torch.nn.Module, *, semantics: Semantics = "fake_quant", during_calibration: bool = False
) -> Iterator[SimulationReport]:
    """Make forward passes of a ModelOpt NVFP4/MXFP4-quantized CPU model use the reference.

    semantics="fake_quant" (default) reproduces what ModelOpt's GPU fake quant computes, so CPU
    and GPU evaluations agree; "export" reproduces the numerics of the exported checkpoint (which
    for MXFP4 rounds ties toward zero). Both use each quantizer's calibrated amax, as ModelOpt's
    fake quant does; `modelopt_glue.calibrate` has already given layers that read one input
    (q/k/v, gate/up) their group's largest amax, which is the shared weight_scale_2 the export writes.

    Yields a SimulationReport. Raises CalibrationError, listing every offending quantizer, when an
    enabled NVFP4 quantizer has no usable calibrated amax or an enabled FP4 quantizer has a layout
    the reference does not implement.

    `during_calibration=True` wraps `mtq.calibrate` itself, for algorithms that run fake-quant
    forwards while they search (AWQ, MSE, GPTQ; pipeline/quant/algorithms.py): quantizers need no
    amax yet, and one without takes ModelOpt's per-call fallback (see `_make_backend`).
    """
    if semantics not in ("fake_quant", "export"):
        raise ValueError(f"semantics must be 'fake_quant' or 'export', got {semantics!r}")
    if _model_on_cuda(model):
        reason = "model is on CUDA: ModelOpt's own FP4 kernels run, the reference is not applied"
        logger.info("%s", reason)
        yield SimulationReport(False, reason, semantics, 0, 0, 0, 0)
        return

    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        register_quant_backend,
        unregister_quant_backend,
    )

    routed, others, problems = _collect(model, need_amax=not during_calibration)
    if problems:
        raise CalibrationError(
            _WHERE,
            f"{len(problems)} FP4 quantizer(s) cannot be simulated on CPU: " + "; ".join(problems),
            "calibrate with mtq.quantize using NVFP4_DEFAULT_CFG or MXFP4_DEFAULT_CFG and a "
            "forward_loop that reaches every quantized layer, or disable those quantizers.",
        )
    counts = {"nvfp4": 0, "mxfp4": 0}
    for q in routed:
        counts[q.kind] += 1
    disabled = sum(1 for q in routed if not q.module.is_enabled)
    reason = (
        f"routed {len(routed)} FP4 quantizer(s) through the reference"
        if routed
        else "no NVFP4/MXFP4 quantizer in the model; nothing to route"
    )
    report = SimulationReport(True, reason, semantics, counts["nvfp4"], counts["mxfp4"], disabled, others)
    if not routed:
        logger.info("%s", reason)
        yield report
        return

    backend_name = f"{FORGE_BACKEND_PREFIX}reference-fp4-{uuid.uuid4().hex}"
    names = {id(q.module): q.name for q in routed}
    register_quant_backend(backend_name, _make_backend(names, semantics, amax_from_input=during_calibration))
    previous = [(q.module, q.module.backend) for q in routed]
    logger.info(
        "%s (nvfp4=%d, mxfp4=%d, %d disabled, %d non-FP4 left to ModelOpt, semantics=%s)",
        reason,
        counts["nvfp4"],
        counts["mxfp4"],
        disabled,
        others,
        semantics,
    )
    try:
        for q in routed:
            q.module.backend = backend_name
        yield report
    finally:
        for module, backend in previous:
            module.backend = backend
        unregister_quant_backend(backend_name)


@contextmanager
def fp4_reference_backend(on_cuda: bool, semantics: Semantics = "fake_quant") -> Iterator[str | None]:
    """A registered quant backend running the reference, for quantizers that do not exist yet.

    ModelOpt's `auto_quantize` builds each candidate format's quantizers itself, so they cannot be
    routed by walking the model; a quant config entry's `backend` field (QuantizerAttributeConfig,
    0.47) names this one instead. Yields None on CUDA, where ModelOpt's kernels run."""
    if on_cuda:
        yield None
        return
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        register_quant_backend,
        unregister_quant_backend,
    )

    name = f"{FORGE_BACKEND_PREFIX}reference-fp4-search-{uuid.uuid4().hex}"
    register_quant_backend(name, _make_backend({}, semantics, amax_from_input=True))
    try:
        yield name
    finally:
        unregister_quant_backend(name)


# ---------------------------------------------------------------------------- engine KV-cache numerics
#
# ModelOpt's FP8 KV fake quant (the `[kv]_bmm_quantizer`s on post-RoPE K and V) scales each tensor by
# its calibrated amax / 448 and rounds to nearest (a float8_e4m3fn cast). The engines differ:
# - the unified HF export writes k_scale / v_scale = amax / 448 (modelopt/torch/export/unified_export_hf.py
#   "kv cache scale as amax / 448", quant_utils.py postprocess_state_dict; measured on the fp8 recipe:
#   0.0013-0.053). vLLM uses those scales (vllm/model_executor/layers/quantization/kv_cache.py,
#   BaseKVCacheMethod.process_weights_after_loading), and its CPU build stores E4M3 by bit truncation,
#   i.e. rounds toward zero, after clamping to +-448 (csrc/cpu/cpu_attn_fp8.hpp float_to_fp8e4m3_scalar:
#   `v * 0x1p-120f`, keep the top bits, no rounding step); "fp8" means E4M3 there;
# - TensorRT-LLM 1.2's PyTorch backend ignores FP8 KV scales (they stay 1.0; FACTS.md) and converts
#   with CUDA's round-to-nearest, saturating conversion: with scale 1.0, entries below E4M3's smallest
#   normal (2**-6) fall into subnormals, and below 2**-10 to zero.
# Truncation shrinks every entry by half a unit in the last place on average (E4M3 has 3 mantissa
# bits: up to 12.5%), a bias rounding to nearest does not have.

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
        return inputs + (outputs - inputs).detach() if _builds_graph(inputs) else outputs

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
