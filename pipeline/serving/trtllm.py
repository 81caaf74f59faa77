"""TensorRT-LLM on this machine, for the build stage: what the runtime offers (`detect_runtime`), the
load test and the legacy `trtllm-build` engine path. The options file is pipeline/serving/trtllm_options.py,
the serve/benchmark commands pipeline/serving/serve_commands.py.

`tensorrt_llm` is imported only inside `run_load_test` and `build_legacy_engine`: its import loads the
C++ bindings, plugins and NVML (tensorrt_llm/_common.py in NVIDIA/TensorRT-LLM 1.2), so a module-level
import would break every CPU machine.
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core.errors import ForgeError
from pipeline.core.formats import ComputeCapability

log = logging.getLogger(__name__)

# The engine (TensorRT) backend was frozen in 1.0-1.2 and removed in 1.3 (docs:
# nvidia.github.io/TensorRT-LLM/legacy/tensorrt-backend-removal.html; NVIDIA/TensorRT-LLM PRs #5312, #15767, #15918).
LAST_ENGINE_RELEASE = (1, 2)
NGC_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release"

# ---------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class LocalRuntime:
    """What this machine offers for a load test or an engine build."""

    tensorrt_llm_version: str | None  # installed distribution, None when absent
    cuda_compute_capability: str | None  # device 0, None without a usable CUDA device
    trtllm_build: str | None  # path of the trtllm-build executable

    def missing_for(self, cc: ComputeCapability) -> list[str]:
        missing = []
        if self.cuda_compute_capability is None:
            missing.append("a CUDA GPU")
        elif ComputeCapability.parse(self.cuda_compute_capability) != cc:
            missing.append(f"a GPU of compute capability {cc} (this one is {self.cuda_compute_capability})")
        if self.tensorrt_llm_version is None:
            missing.append("tensorrt_llm")
        return missing


def detect_runtime() -> LocalRuntime:
    """Look without importing tensorrt_llm (its import needs the GPU stack)."""
    version = None
    if importlib.util.find_spec("tensorrt_llm") is not None:
        try:
            version = metadata.version("tensorrt_llm")
        except metadata.PackageNotFoundError:
            version = "unknown"
    cc = None
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            cc = f"{major}.{minor}"
    except ImportError:
        pass
    return LocalRuntime(version, cc, shutil.which("trtllm-build"))


def release_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def check_engine_environment(runtime: LocalRuntime, cc: ComputeCapability, where: str) -> None:
    """`engine: tensorrt` needs a GPU of the target's compute capability, tensorrt_llm <= 1.2 and
    trtllm-build. Raise before anything is written when one is missing."""
    missing = runtime.missing_for(cc)
    if runtime.tensorrt_llm_version is not None and release_tuple(runtime.tensorrt_llm_version) > LAST_ENGINE_RELEASE:
        missing.append(f"tensorrt_llm <= 1.2 (installed: {runtime.tensorrt_llm_version}; 1.3 removed trtllm-build)")
    if runtime.trtllm_build is None:
        missing.append("the trtllm-build command")
    if missing:
        raise ForgeError(
            where,
            f"engine: tensorrt builds a TensorRT engine, which needs {', '.join(missing)}; none of that is here.",
            f"run this stage on a GPU node of compute capability {cc} inside the NGC container "
            f"{NGC_IMAGE}:1.2.x, or set build.engine: pytorch (no engine step; TensorRT-LLM >= 1.0 "
            "serves the unified checkpoint directly).",
        )


# ---------------------------------------------------------------------------- load test

LOAD_TEST_PROMPT = "The capital of France is"
LOAD_TEST_TOKENS = 16


@dataclass(frozen=True)
class LoadTestResult:
    tested: bool
    reason: str | None  # why not, when tested is False
    prompt: str = LOAD_TEST_PROMPT
    output_text: str | None = None
    runtime_kv_capacity_tokens: int | None = None  # what the runtime's KV stats report
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "load_tested": self.tested,
            "reason": self.reason,
            "prompt": self.prompt if self.tested else None,
            "output_text": self.output_text,
            "runtime_kv_capacity_tokens": self.runtime_kv_capacity_tokens,
        }  # not `seconds`: the build's `load_test_s` timing (a manifest holds no wall-clock byte)


def not_run(reason: str) -> LoadTestResult:
    return LoadTestResult(tested=False, reason=reason)


def run_load_test(model_dir: Path, options: dict[str, Any], tokenizer_dir: Path | None = None) -> LoadTestResult:
    """Load the bundle with the LLM API (PyTorch backend), generate greedily from a fixed prompt
    and read the KV capacity back from the runtime's iteration stats. The caller has checked the
    GPU and tensorrt_llm are present."""
    from tensorrt_llm import LLM, SamplingParams  # lazy: needs the GPU stack
    from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

    kwargs = dict(options)
    kwargs["kv_cache_config"] = KvCacheConfig(**options["kv_cache_config"])
    if "cuda_graph_config" in options:
        kwargs["cuda_graph_config"] = CudaGraphConfig(**options["cuda_graph_config"])
    # Iteration stats carry kvCacheStats {maxNumBlocks, tokensPerBlock, ...}: the runtime's own
    # count of the pool it allocated, the number to set beside the planner's prediction.
    kwargs["enable_iter_perf_stats"] = True
    start = time.perf_counter()
    llm = LLM(model=str(model_dir), tokenizer=str(tokenizer_dir) if tokenizer_dir else None, **kwargs)
    try:
        outputs = llm.generate([LOAD_TEST_PROMPT], SamplingParams(max_tokens=LOAD_TEST_TOKENS, temperature=0.0))
        text = outputs[0].outputs[0].text
        capacity = runtime_kv_capacity(list(llm.get_stats(timeout=2)))
    finally:
        llm.shutdown()
    if not text.strip():
        raise ForgeError(str(model_dir), "the load test generated no text.", "check the checkpoint and the calibrate stage's export.")
    return LoadTestResult(True, None, LOAD_TEST_PROMPT, text, capacity, round(time.perf_counter() - start, 3))


def runtime_kv_capacity(stats: list[Any]) -> int | None:
    """Tokens the KV pool holds, from the last iteration stats entry that has kvCacheStats."""
    import json

    for entry in reversed(stats):
        if isinstance(entry, str):
            entry = json.loads(entry)
        kv = entry.get("kvCacheStats") if isinstance(entry, dict) else None
        if kv and kv.get("maxNumBlocks") and kv.get("tokensPerBlock"):
            return int(kv["maxNumBlocks"]) * int(kv["tokensPerBlock"])
    return None


# ---------------------------------------------------------------------------- legacy engine


def trtllm_build_argv(checkpoint_dir: Path, engine_dir: Path, options: dict[str, Any], format_name: str, tp: int) -> list[str]:
    """trtllm-build with the planner's limits (tensorrt_llm/commands/build.py, TensorRT-LLM 1.2). Activation memory is
    fixed at build time from max_num_tokens, so these must equal the runtime options."""
    argv = [
        "trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir),
        "--max_batch_size", str(options["max_batch_size"]), "--max_input_len", str(options["max_input_len"]),
        "--max_seq_len", str(options["max_seq_len"]), "--max_num_tokens", str(options["max_num_tokens"]),
        "--kv_cache_type", "paged", "--use_paged_context_fmha", "enable", "--workers", str(tp),
    ]
    if format_name == "fp8":
        # FP8 context FMHA runs on Hopper+ FP8 attention kernels; the GEMM plugin is recommended
        # off for FP8 so TensorRT picks its own FP8 GEMMs (TensorRT-LLM quantization docs, 1.x).
        argv += ["--use_fp8_context_fmha", "enable", "--gemm_plugin", "disable"]
    else:
        argv += ["--gemm_plugin", "auto"]
    return argv


def build_legacy_engine(
    base_model_dir: Path,
    quant_state: Path,
    work_dir: Path,
    options: dict[str, Any],
    format_name: str,
    tp: int,
    decoder_type: str = "llama",
) -> Path:
    """Restore the calibrated model, export a TensorRT-LLM checkpoint for `tp` ranks and build
    the engine into work_dir/engine. The caller ran check_engine_environment first."""
    import torch  # lazy: GPU node only
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from transformers import AutoModelForCausalLM

    from pipeline.quant.quant_state import restore_quant_state

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, torch_dtype=torch.bfloat16).cuda().eval()
    model = restore_quant_state(model, quant_state)
    trt_checkpoint = work_dir / "trtllm_checkpoint"
    with torch.inference_mode():
        # inference_tensor_parallel defaults to 0, which divides by zero (seen here with ModelOpt 0.47): pass TP.
        export_tensorrt_llm_checkpoint(
            model, decoder_type, dtype=torch.bfloat16, export_dir=trt_checkpoint,
            inference_tensor_parallel=tp, inference_pipeline_parallel=1,
        )
    del model
    torch.cuda.empty_cache()
    engine_dir = work_dir / "engine"
    argv = trtllm_build_argv(trt_checkpoint, engine_dir, options, format_name, tp)
    log.info("running %s", shlex.join(argv))
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ForgeError("trtllm-build", f"exited with {done.returncode}: {done.stderr.strip()[-800:]}",
                         "see the log above; the limits come from the recipe's target (lower max_num_tokens or max_batch_size).")
    shutil.rmtree(trt_checkpoint)  # the engine supersedes it; the unified checkpoint stays in the bundle
    return engine_dir


