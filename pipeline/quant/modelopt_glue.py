"""ModelOpt glue: build the quant config, calibrate, check the calibration, save/restore, export.

Everything here is written against nvidia-modelopt 0.47 (pinned); its API changes monthly, so each
call names the ModelOpt source it relies on. No function reads argv, env or global state.

Order of use in the calibrate stage (evaluation needs the fake-quant model, and exporting
converts that model's weights in place, so export comes last):

    config = build_quant_config(fmt.modelopt_config, recipe.kv_cache_dtype, recipe.exclude)
    result = calibrate(model, config, batches, progress=True)   # raises if ranges are unusable
    save_quant_state(model, state_path)                         # ~0.5 MB; restores exactly
    ... evaluate the fake-quant model ...
    export_unified(model, out_dir)                              # model is consumed
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import CalibrationError, RecipeError, StageInputError
from pipeline.quant.simulate import FORGE_BACKEND_PREFIX

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

_STATE_FILE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Quant config
# --------------------------------------------------------------------------------------------


def build_quant_config(modelopt_preset: str, kv_cache: str, exclude: list[str],
                       extra_entries: list[dict[str, Any]] | None = None,
                       algorithm: Any = "preset") -> dict[str, Any]:
    """Return a fresh ModelOpt quant config: the named preset + exclusions + KV-cache choice.

    `modelopt_preset` names a config in `modelopt.torch.quantization` (e.g. "FP8_DEFAULT_CFG");
    `kv_cache` is a name from the format registry's KV_CACHE_DTYPES ("auto" keeps the KV cache
    in the model dtype); `exclude` holds fnmatch patterns over module names ("*lm_head*",
    "*layers.0.*", "model.layers.3.mlp.down_proj") whose quantizers stay disabled.

    `extra_entries` (per-layer overrides, pipeline/quant/mixed.py) go after the exclusions, so
    they win over them, and before the KV entries. `algorithm` replaces the preset's calibration
    algorithm (a ModelOpt method name or dict; pipeline/quant/algorithms.py); "preset" keeps it.

    The shared preset is never mutated: ModelOpt's presets are module-level dicts that every
    caller in the process sees.

    lm_head stays BF16 without any help from us: every 0.47 model preset imports
    `modelopt_recipes/configs/ptq/units/default_disabled_quantizers.yaml`, whose
    `{quantizer_name: '*lm_head*', enable: false}` entry is what decides it (the presets also
    disable `nn.Embedding` by parent class, so embeddings are never quantized either).
    """
    # Imported lazily: importing ModelOpt takes seconds and registers plugins; modules that
    # only need the dataclasses below should not pay for it.
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import choices as modelopt_choices
    from modelopt.torch.quantization.utils import update_quant_cfg_with_kv_cache_quant

    from pipeline.formats import KV_CACHE_DTYPES

    # KV-only presets (FP8_KV_CFG, ...) are chosen through `kv_cache`, never as the preset.
    model_presets = sorted(c for c in modelopt_choices if c.endswith("_CFG") and "_KV_" not in c)
    if modelopt_preset not in model_presets:
        known = ", ".join(model_presets)
        raise RecipeError(
            "format.modelopt_config",
            f"{modelopt_preset!r} is not a ModelOpt {_modelopt_version()} quantization preset.",
            f"use one of: {known}.",
        )
    if kv_cache not in KV_CACHE_DTYPES:
        raise RecipeError(
            "kv_cache_dtype",
            f"unknown KV-cache dtype {kv_cache!r}.",
            f"use one of: {', '.join(KV_CACHE_DTYPES)}.",
        )
    config = copy.deepcopy(getattr(mtq, modelopt_preset))
    # 0.47 presets hold an ordered list; entries apply in order and later ones win
    # (docstring of modelopt.torch.quantization.conversion.set_quantizer_by_cfg).
    config["quant_cfg"] = list(config.get("quant_cfg") or []) + _exclude_entries(exclude) + list(extra_entries or [])
    if algorithm != "preset":
        config["algorithm"] = copy.deepcopy(algorithm)

    kv_preset = KV_CACHE_DTYPES[kv_cache].modelopt_config
    if kv_preset is not None:
        # The same helper hf_ptq.py uses (examples/llm_ptq/hf_ptq.py, 0.47): it deep-copies,
        # appends the KV entries and sets algorithm "max" when the preset has none (MXFP4 has
        # `algorithm: None`, but KV scales need calibrating). Appending the KV entries after our
        # exclusions is deliberate: TensorRT-LLM allocates one KV pool with one dtype
        # (KvCacheConfig.dtype), so a layer excluded from weight quantization keeps a
        # quantized KV cache and still needs its k/v scales.
        # It prints the whole merged config on one line (print_rank_0 in
        # modelopt/torch/quantization/utils/core_utils.py, 0.47): DEBUG only.
        with _stdout_to_debug_log("modelopt: "):
            config = update_quant_cfg_with_kv_cache_quant(config, copy.deepcopy(getattr(mtq, kv_preset)["quant_cfg"]))
    return config


def _exclude_entries(exclude: list[str]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for pattern in exclude:
        if not isinstance(pattern, str) or not pattern.strip():
            raise RecipeError(
                "exclude",
                f"exclude patterns must be non-empty strings, got {pattern!r}.",
                'write module-name patterns such as "*lm_head*" or "*layers.0.*".',
            )
        # ModelOpt matches quantizer names ("model.layers.0.mlp.down_proj.weight_quantizer"),
        # so a plain module name matches nothing on its own; also cover its children.
        entries.append({"quantizer_name": pattern, "enable": False})
        if not pattern.endswith("*"):
            entries.append({"quantizer_name": f"{pattern}.*", "enable": False})
    return entries


# --------------------------------------------------------------------------------------------
# Calibration and its checks
# --------------------------------------------------------------------------------------------


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
) -> CalibrationResult:
    """Insert ModelOpt quantizers into `model` (in place) and calibrate them on `batches`.

    Then unifies the scales of Linears that read one input (`unify_fused_shard_scales`), so
    the calibrated model is the one engines run after fusing q/k/v and gate/up.

    `before_calibration(model)`: called once the quantizers exist, before any forward pass (the
    calibrate stage checks there that no fused group is split across formats).

    `input_device`: where batches go; for a model dispatched over several devices, the device its
    first module executes on (pipeline.modeling.input_device). Default: the first parameter's.

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
    with _stdout_to_debug_log("modelopt: "):
        # Two steps instead of one mtq.quantize(config, forward_loop), which is the same pair
        # (model_quant.py: apply the quantize mode, then `calibrate(model, config["algorithm"])`):
        # algorithms that search (AWQ, MSE, GPTQ) run fake-quant forwards, which for FP4 on CPU
        # must go through forge's reference, and the quantizers exist only after the first step.
        mtq.quantize(model, {**config, "algorithm": None}, None)
        if before_calibration is not None:
            before_calibration(model)
        with reference_fp4_simulation(model, during_calibration=True):
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
def _stdout_to_debug_log(prefix: str) -> Iterator[None]:
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


def _modelopt_version() -> str:
    import modelopt

    return modelopt.__version__


# --------------------------------------------------------------------------------------------
# Quant state save / restore
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantStateFile:
    path: Path
    size_bytes: int
    quantizers_with_buffers: int


def canonical_order(value: Any) -> Any:
    """`value` with every string-keyed dict's keys sorted, recursively. ModelOpt builds each
    quantizer's saved attributes by iterating a set, whose order follows the interpreter's string
    hash seed, so two processes pickled the same state in different orders (the fleet check's
    quant_state.pt mismatch; torch's serialization_id hashes the pickle, so it differed too).
    Restoring reads the dicts by key, so the order carries no meaning."""
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: canonical_order(value[k]) for k in sorted(value)}
    if isinstance(value, dict):
        return {k: canonical_order(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(canonical_order(v) for v in value)
    return value


def without_forge_backends(value: Any) -> Any:
    """`value` with every quantizer `backend` that names one of forge's own quant backends (the
    FP4 reference simulation's, registered per process under a fresh uuid: pipeline/quant/simulate.py)
    set back to None. ModelOpt snapshots quantizer attributes into its mode metadata when calibration
    ends, which for FP4 runs inside the simulation, so the saved state named a backend that exists
    only in the process that wrote it (and made each run's bytes differ)."""
    if isinstance(value, dict):
        return {k: (None if k == "backend" and isinstance(v, str) and v.startswith(FORGE_BACKEND_PREFIX)
                    else without_forge_backends(v)) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(without_forge_backends(v) for v in value)
    return value


def save_quant_state(model: nn.Module, path: Path | str) -> QuantStateFile:
    """Write the ModelOpt state plus every quantizer's buffers (amax, ...) to one file.

    `mto.modelopt_state()` alone records the quantizer layout but not the calibrated amax
    values (a restored SmolLM2-135M scored ppl 461,576; FACTS.md), so the quantizer state
    dicts go in too, as ModelOpt's own HF-trainer plugin does
    (modelopt/torch/quantization/plugins/transformers_trainer.py, 0.47). The model weights are
    not saved: they are the unchanged base checkpoint.
    """
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.utils import get_quantizer_state_dict

    path = Path(path)
    quantizer_states = get_quantizer_state_dict(model)
    if not quantizer_states:
        raise CalibrationError("save_quant_state", "the model has no ModelOpt quantizers.", "calibrate it first.")
    payload = canonical_order({
        "forge_quant_state_version": _STATE_FILE_VERSION,
        "modelopt_state": without_forge_backends(mto.modelopt_state(model)),
        "quantizer_state_dict": {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in quantizer_states.items()},
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialized in memory: torch.save names the zip archive's root folder after the file it writes
    # (torch/serialization.py, `_open_zipfile_writer_file`), so saving to the random temporary name
    # made every run's bytes differ (the fleet check's quant_state.pt mismatch). A buffer's archive
    # root is always "archive"; the bytes then depend on the payload only.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(buffer.getbuffer())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with_buffers = sum(1 for v in payload["quantizer_state_dict"].values() if v)
    return QuantStateFile(path, path.stat().st_size, with_buffers)


def restore_quant_state(base_model: nn.Module, path: Path | str) -> nn.Module:
    """Turn a fresh, unquantized copy of the base model back into the calibrated model.

    Returns the model ModelOpt hands back (the same object, converted in place).
    """
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils import set_quantizer_state_dict

    path = Path(path)
    if not path.is_file():
        raise StageInputError(str(path), "quant state file not found.", "re-run the calibrate stage.")
    if any(isinstance(m, TensorQuantizer) for m in base_model.modules()):
        raise StageInputError(
            str(path),
            "the model to restore into is already quantized.",
            "load a fresh copy of the unquantized base model.",
        )
    # weights_only=True: the file is plain dicts, lists, strings and tensors.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("forge_quant_state_version") != _STATE_FILE_VERSION:
        raise StageInputError(
            str(path),
            "not a forge quant state file (or one from another forge version).",
            "re-run the calibrate stage to write it again.",
        )
    saved_version = payload["modelopt_state"].get("modelopt_version")
    if saved_version != _modelopt_version():
        log.warning(
            "%s was written by ModelOpt %s, restoring with %s",
            path,
            saved_version,
            _modelopt_version(),
        )
    model = mto.restore_from_modelopt_state(base_model, payload["modelopt_state"])
    present = {n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    missing = sorted(set(payload["quantizer_state_dict"]) - present)
    if missing:
        raise StageInputError(
            str(path),
            f"{len(missing)} saved quantizers do not exist in the restored model (e.g. {', '.join(missing[:3])}).",
            "restore into the same base model the state was calibrated on.",
        )
    set_quantizer_state_dict(model, payload["quantizer_state_dict"])
    return model


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    path: Path
    seconds: float
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def export_unified(model: nn.Module, out_dir: Path | str, dtype: torch.dtype = torch.bfloat16) -> ExportResult:
    """Write the ModelOpt unified HF checkpoint that TensorRT-LLM's PyTorch backend loads.

    The model is consumed: `export_hf_checkpoint` packs the quantized weights in place, and
    the model cannot run a forward pass afterwards (0.47 on CPU: "expected m1 and m2 to have the
    same dtype, but got: float != c10::Float8_e4m3fn"). Evaluate
    and `save_quant_state` before exporting.

    Unquantized tensors are cast to `dtype` here, not by `export_hf_checkpoint(dtype=...)`:
    with 0.47 that argument alone left embeddings, norms, lm_head and excluded Linears in the
    in-memory dtype (checked on a tiny Llama: all F32 after a CPU calibration in fp32, which is
    what CPUs without bf16 need; FACTS.md). Quantizer buffers (amax) stay fp32 so the exported
    scales are the ones the fake-quant model was evaluated with.

    Files go to a temporary sibling directory that is renamed onto `out_dir` only when complete;
    an existing `out_dir` is replaced.
    """
    from modelopt.torch.export import export_hf_checkpoint

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _cast_unquantized(model, dtype)
    config = getattr(model, "config", None)
    if config is not None:
        # Written to config.json; ModelOpt also warns when it differs from `dtype`
        # (_resolve_export_dtype in unified_export_hf.py).
        config.dtype = dtype
        if not getattr(config, "architectures", None):
            # ModelOpt's export dummy forward iterates config.architectures
            # (export/model_utils.py is_multimodal_model); save_pretrained fills it the same way.
            config.architectures = [type(model).__name__]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    start = time.perf_counter()
    try:
        with _stdout_to_debug_log("modelopt export: "):
            export_hf_checkpoint(model, dtype=dtype, export_dir=tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    seconds = time.perf_counter() - start
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    log.info("exported %s (%.1f MB) in %.1f s", out_dir, sum(files.values()) / 1e6, seconds)
    return ExportResult(path=out_dir, seconds=seconds, files=files)


def _cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizer_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, TensorQuantizer))
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            # AWQ's per-channel input smoothing scale multiplies the activations in the export's
            # dummy forward (requantize_resmooth_fused_llm_layers, unified_export_hf.py); an fp32
            # scale on a BF16 model makes that forward fail ("expected m1 and m2 to have the same
            # dtype", seen on CPU). On a BF16 GPU calibration ModelOpt creates it in BF16.
            scale = module._buffers.get("_pre_quant_scale")
            if scale is not None and scale.is_floating_point() and scale.dtype != dtype:
                module._buffers["_pre_quant_scale"] = scale.to(dtype)
            continue
        if f"{name}.".startswith(quantizer_prefixes):
            continue
        for _pname, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                # .data keeps the Parameter object, so tied weights stay tied.
                param.data = param.data.to(dtype)
        for bname, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[bname] = buf.to(dtype)
