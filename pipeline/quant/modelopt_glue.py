"""ModelOpt glue: insert quantizers, calibrate them, check the calibration.

Everything in pipeline/quant/ that calls ModelOpt is written against nvidia-modelopt 0.47 (pinned);
its API changes monthly, so each call names the ModelOpt source it relies on. No function reads
argv, env or global state.

Order of use in the calibrate stage (evaluation needs the fake-quant model, and exporting
converts that model's weights in place, so export comes last):

    config = build_quant_config(fmt.modelopt_config, recipe.kv_cache_dtype, recipe.exclude)  # quant_config.py
    result = calibrate(model, config, batches, progress=True)   # here; raises if ranges are unusable
    save_quant_state(model, state_path)                         # quant_state.py: ~0.5 MB; restores exactly
    ... evaluate the fake-quant model ...
    export_unified(model, out_dir)                              # hf_export.py: model is consumed
"""

from __future__ import annotations

import contextlib
import io
import logging
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import CalibrationError

log = logging.getLogger(__name__)

# How many offending module names an error message spells out before summarising the rest.
_MAX_NAMES_IN_ERROR = 8

# Quantizer kinds counted in QuantizerSummary, named after the ModelOpt attribute that holds
# them: `weight_quantizer`/`input_quantizer`/`output_quantizer` on every QuantLinear
# (modelopt/torch/quantization/nn/modules/quant_module.py) and `k_bmm_quantizer`/
# `v_bmm_quantizer` on attention modules wrapped for KV-cache quantization
# (modelopt/torch/quantization/plugins/huggingface.py). `q_bmm`/`p_bmm` and anything else
# count as "other".
QUANTIZER_KINDS: tuple[str, ...] = ("weight", "input", "output", "kv", "other")


@dataclass(frozen=True)
class QuantizerSummary:
    """How many ModelOpt quantizers are enabled / disabled, by kind."""

    enabled: dict[str, int]
    disabled: dict[str, int]
    static_ranges: int  # enabled quantizers whose calibrated amax was checked
    dynamic_ranges: int  # enabled quantizers whose scales are computed at run time (MX, dynamic)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": dict(self.enabled),
            "disabled": dict(self.disabled),
            "static_ranges": self.static_ranges,
            "dynamic_ranges": self.dynamic_ranges,
        }


@dataclass(frozen=True)
class CalibrationResult:
    seconds: float
    batches_seen: int  # 0 when ModelOpt needed no forward pass (e.g. MXFP4: algorithm None)
    peak_rss_bytes: int  # process-lifetime peak (getrusage), which includes model loading
    peak_cuda_bytes: int | None  # peak allocated during calibration; None on CPU
    quantizer_summary: QuantizerSummary
    fused_groups: int = 0  # Linear groups reading one input whose scales were unified

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "fused_groups": self.fused_groups,
            "batches_seen": self.batches_seen,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "quantizers": self.quantizer_summary.to_dict(),
        }


def calibrate(
    model: nn.Module,
    quant_config: Mapping[str, Any],
    batches: Iterable[Mapping[str, torch.Tensor]],
    progress: bool,
    input_device: str | torch.device | None = None,
    before_calibration: Any = None,
    around_calibration: Any = None,
) -> CalibrationResult:
    """Insert ModelOpt quantizers into `model` (in place) and calibrate them on `batches`.

    Then unifies the scales of Linears that read one input (`unify_fused_shard_scales`), so
    the calibrated model is the one engines run after fusing q/k/v and gate/up.

    `before_calibration(model)`: called once the quantizers exist, before any forward pass (the
    calibrate stage checks there that no fused group is split across formats).
    `around_calibration`: a context manager entered around the calibration passes only (the stage
    counts routed tokens per expert there: pipeline/quant/experts.py).

    `input_device`: where batches go; for a model dispatched over several devices, the device its
    first module executes on (pipeline.sources.loading.input_device). Default: the first parameter's.

    Runs on whatever device the model is on (the stage puts it on CUDA when one is present);
    each batch (`input_ids`, `attention_mask`) is moved there. Raises CalibrationError when a
    quantizer that needs a static range did not get one (see `check_calibrated`).

    FP4 on CPU: max calibration alone needs no help (ModelOpt turns fake quantization off while
    it collects statistics, `enable_stats_collection` in modelopt/torch/quantization/model_calib.py,
    0.47), but AWQ, MSE and GPTQ fake-quantize while they search, which ModelOpt's FP4 code does
    only on CUDA, so calibration runs inside `reference_fp4_simulation(during_calibration=True)`
    (a no-op on CUDA). A forward pass *after* calibration (evaluation) needs the same wrapper.
    """
    import modelopt.torch.quantization as mtq
    from tqdm.auto import tqdm

    from pipeline.quant.simulate import reference_fp4_simulation

    device = torch.device(input_device) if input_device is not None else _model_device(model)
    # Materialised because ModelOpt may call the loop more than once (e.g. AWQ-style
    # algorithms) and a generator would be empty the second time; token ids are small.
    batch_list = list(batches)
    seen = 0

    def forward_loop(m: nn.Module) -> None:
        nonlocal seen
        bar = tqdm(batch_list, desc="calibrate", unit="batch", disable=not progress)
        with torch.no_grad():
            for batch in bar:
                m(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
                seen += 1

    if not batch_list:
        log.warning("calibrate: no calibration batches; only weight ranges can be calibrated")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    config = dict(quant_config)
    with stdout_to_debug_log("modelopt: "):
        # Two steps instead of one mtq.quantize(config, forward_loop), which is the same pair
        # (model_quant.py: apply the quantize mode, then `calibrate(model, config["algorithm"])`):
        # algorithms that search (AWQ, MSE, GPTQ) run fake-quant forwards, which for FP4 on CPU
        # must go through forge's reference, and the quantizers exist only after the first step.
        mtq.quantize(model, {**config, "algorithm": None}, None)
        if before_calibration is not None:
            before_calibration(model)
        with reference_fp4_simulation(model, during_calibration=True), around_calibration or contextlib.nullcontext():
            mtq.calibrate(model, config.get("algorithm"), forward_loop)
    fused_groups = unify_fused_shard_scales(model)
    seconds = time.perf_counter() - start
    peak_cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    summary = check_calibrated(model)
    log.info(
        "calibrated %d quantizers in %.1f s over %d batches",
        sum(summary.enabled.values()),
        seconds,
        seen,
    )
    return CalibrationResult(
        seconds=seconds,
        batches_seen=seen,
        peak_rss_bytes=_peak_rss_bytes(),
        peak_cuda_bytes=peak_cuda,
        quantizer_summary=summary,
        fused_groups=fused_groups,
    )


def unify_fused_shard_scales(model: nn.Module) -> int:
    """Give Linears that read one input (q/k/v, gate/up) one shared set of per-tensor scales.

    Engines run such groups as one fused GEMM with one scale each, so every one of them rescales
    at load time when the shards' scales differ: vLLM's ModelOpt FP8 path re-quantizes the fused
    weight to the shards' max `weight_scale` and takes the max `input_scale`
    (vllm/model_executor/layers/quantization/modelopt.py `process_weights_after_loading` ->
    utils/w8a8_utils.py `requantize_with_max_scale`, an op only vLLM's CUDA build has: the CPU
    build refuses the checkpoint); TensorRT-LLM's FP8 linear does the same max-rescale and its
    NVFP4 linear *asserts* equal `input_scale` and `weight_scale_2` across fused shards
    (tensorrt_llm/_torch/modules/linear.py, FP8QDQLinearMethod / NVFP4LinearMethod
    `load_weights_fused_qkv_linear`, `load_weights_fused_gate_up_linear`).

    We do it once, here, with ModelOpt's own mechanism: `collect_shared_input_modules` finds
    the groups by a dummy forward (quantizers disabled, so it runs on CPU for every format), and
    `preprocess_linear_fusion` sets each group's input and per-tensor weight amax to the
    group's max (modelopt/torch/export/unified_export_hf.py and quant_utils.py, 0.47). ModelOpt's
    export calls the same pair, but skips FP8 groups (`_fuse_shared_input_modules` excludes
    QUANTIZATION_FP8), which is why a plain FP8 export carries one weight_scale per shard.
    Doing it right after calibration, before evaluation and `save_quant_state`, means the
    fake-quant model we score is the one we export, and the export quantizes each weight once
    from its high-precision values at the shared scale (the engines' load-time path rounds twice).
    MX formats have no per-tensor amax, so their groups are left alone by
    `preprocess_linear_fusion`. Returns the number of groups unified.
    """
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion
    from modelopt.torch.export.unified_export_hf import collect_shared_input_modules

    device = _model_device(model)

    def dummy_forward() -> None:
        # The same probe ModelOpt's export runs (requantize_resmooth_fused_llm_layers).
        model(torch.ones([1, 2], dtype=torch.long, device=device))

    input_to_linear, _ = collect_shared_input_modules(model, dummy_forward)
    groups = [modules for modules in input_to_linear.values() if len(modules) > 1]
    for modules in groups:
        preprocess_linear_fusion(modules)
    log.info("unified per-tensor scales of %d fused-shard groups", len(groups))
    return len(groups)


@contextlib.contextmanager
def stdout_to_debug_log(prefix: str) -> Iterator[None]:
    """ModelOpt prints to stdout (`print` in modelopt/torch/quantization/conversion.py and
    model_quant.py, 0.47), including the whole quantization config on one 1,800-character line:
    keep it at DEBUG (`forge -v`), out of the stage's log."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("%s%s", prefix, line)


def check_calibrated(model: nn.Module) -> QuantizerSummary:
    """Check every enabled quantizer that needs a static range has a finite, positive amax.

    "Needs a static range" mirrors ModelOpt 0.47's own test in
    `_needs_activation_forward_for_max_calib` (model_calib.py): an enabled quantizer with a
    calibrator that is not dynamic (`type: dynamic`), not MX (E8M0 block scales, no per-tensor
    amax) and not pinned to a constant amax. An input quantizer that never saw data (a MoE
    expert no calibration token was routed to, an empty loop) has no amax and would export a
    missing or infinite scale.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = dict.fromkeys(QUANTIZER_KINDS, 0)
    disabled = dict.fromkeys(QUANTIZER_KINDS, 0)
    static = dynamic = 0
    bad: list[str] = []
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer):
            continue
        kind = _quantizer_kind(name)
        if not q.is_enabled:
            disabled[kind] += 1
            continue
        enabled[kind] += 1
        if not _needs_static_range(q):
            dynamic += 1
            continue
        static += 1
        amax = getattr(q, "_amax", None)
        if amax is None or amax.numel() == 0:
            bad.append(f"{name} (no amax)")
        elif not bool(torch.isfinite(amax).all()) or not bool((amax > 0).all()):
            bad.append(f"{name} (amax min {amax.min().item():g}, max {amax.max().item():g})")
    if sum(enabled.values()) + sum(disabled.values()) == 0:
        raise CalibrationError(
            "calibration",
            "the model has no ModelOpt quantizers.",
            "run calibrate() (mtq.quantize) or restore_quant_state() first.",
        )
    if bad:
        shown = ", ".join(bad[:_MAX_NAMES_IN_ERROR])
        more = f" and {len(bad) - _MAX_NAMES_IN_ERROR} more" if len(bad) > _MAX_NAMES_IN_ERROR else ""
        raise CalibrationError(
            "calibration",
            f"{len(bad)} of {static} quantizers that need a calibrated range have no finite "
            f"positive amax: {shown}{more}.",
            "calibrate with more or longer samples so every layer sees data (MoE experts need "
            "tokens routed to them), or add these layers to the recipe's `exclude` list.",
        )
    return QuantizerSummary(enabled=enabled, disabled=disabled, static_ranges=static, dynamic_ranges=dynamic)


def _needs_static_range(q: Any) -> bool:
    if q._dynamic or q.is_mx_format:
        return False
    if q._use_constant_amax or getattr(q, "_constant_amax", None) is not None:
        return False
    return getattr(q, "_calibrator", None) is not None


def _quantizer_kind(name: str) -> str:
    # SequentialQuantizer children are named "...weight_quantizer.0"; look at the last
    # component that is a quantizer attribute.
    attr = next((p for p in reversed(name.split(".")) if p.endswith("quantizer")), "")
    if attr == "weight_quantizer":
        return "weight"
    if attr == "input_quantizer":
        return "input"
    if attr == "output_quantizer":
        return "output"
    if attr in ("k_bmm_quantizer", "v_bmm_quantizer"):
        return "kv"
    return "other"


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # getrusage(2): ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def modelopt_version() -> str:
    import modelopt

    return modelopt.__version__
