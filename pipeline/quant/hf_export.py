"""Export a calibrated model as the ModelOpt unified HF checkpoint that the engines load.

Written against nvidia-modelopt 0.47 (pinned); the order of use is in pipeline/quant/modelopt_glue.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.quant.modelopt_glue import stdout_to_debug_log

log = logging.getLogger(__name__)


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
    what CPUs without bf16 need: bf16 ran >10x slower here). Quantizer buffers (amax) stay fp32 so the exported
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
        with stdout_to_debug_log("modelopt export: "):
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
