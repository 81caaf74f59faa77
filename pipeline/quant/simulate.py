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

from pipeline.core.errors import CalibrationError
from pipeline.quant.reference import mxfp4_quantize_dequantize, nvfp4_quantize_dequantize

logger = logging.getLogger(__name__)

Semantics = Literal["fake_quant", "export"]
# Every quant backend forge registers is named with this prefix and a fresh uuid (one per process
# and context); quant_state.save_quant_state drops such names from what it saves.
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
        if reuse is None or builds_graph(inputs):
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
        if builds_graph(inputs):
            # Straight-through gradient, as ModelOpt's dynamic block quant (pass_through_bwd).
            return inputs + (outputs - inputs).detach()
        return outputs

    return backend


def builds_graph(inputs: torch.Tensor) -> bool:
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
