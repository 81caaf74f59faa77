"""The TensorRT-LLM LLM-API options file (`--extra_llm_api_options`) for one target, and the option
names the pinned release accepts.

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

Pure: plan + target in, a dict out, testable on any CPU.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.engines.contracts import TENSORRT_LLM_VERSION
from pipeline.recipe.schema import Target
from pipeline.sizing.memory import KV_BLOCK_TOKENS
from pipeline.sizing.plan import Plan

PINNED_VERSION = TENSORRT_LLM_VERSION  # pinned once, in pipeline/engines/contracts.py

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


# MoeConfig(StrictBaseModel), same file, 1.2 line: backend is one of AUTO (the default), CUTLASS,
# CUTEDSL, WIDEEP, TRTLLM, DEEPGEMM, VANILLA, TRITON.
MOE_CONFIG_FIELDS = frozenset({"backend", "max_num_tokens", "load_balancer", "disable_finalize_fusion",
                               "use_low_precision_moe_combine"})


NESTED_FIELDS = {"kv_cache_config": KV_CACHE_CONFIG_FIELDS, "cuda_graph_config": CUDA_GRAPH_CONFIG_FIELDS,
                 "moe_config": MOE_CONFIG_FIELDS}


def moe_backend(model_type: str, compute_capability: str, attention_dp: bool) -> str:
    """The fused-MoE kernels for a model on an SM, as TensorRT-LLM and its deployment configs choose
    them, written out so the options file does not depend on a default that moves between releases:
    - gpt-oss on Hopper: TRITON (ModelConfig.resolve_moe_backend, tensorrt_llm/_torch/model_config.py:
      AUTO gives "TRITON" for GptOssForCausalLM on SM 90-99; the H200 configs in
      examples/configs/database/openai/gpt-oss-120b set it too);
    - gpt-oss on Blackwell: TRTLLM (AUTO's choice for SM 100-119, and examples/configs/gpt-oss-120b-latency.yaml),
      but CUTLASS with attention DP (examples/configs/gpt-oss-120b-throughput.yaml: tp 8, ep 8,
      enable_attention_dp, backend CUTLASS);
    - every other model: CUTLASS, AUTO's resolution, which runs BF16, per-tensor FP8 (SM >= 89) and
      NVFP4 (SM 100/103) experts (fused_moe_cutlass.py). DEEPGEMM, which NVIDIA's DeepSeek-R1 B200
      configs name, needs FP8 *block* scales (DeepSeek's own checkpoint), not ModelOpt's per-tensor FP8."""
    major = int(compute_capability.partition(".")[0])
    if model_type == "gpt_oss" and major == 9:
        return "TRITON"
    if model_type == "gpt_oss" and major == 10:
        return "CUTLASS" if attention_dp else "TRTLLM"
    return "CUTLASS"


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
    # Under attention DP each rank schedules its own requests from its own KV pool, so the batch and
    # the KV tokens are per rank: NVIDIA's gpt-oss-120b throughput config (tp 8, enable_attention_dp)
    # gives max_batch_size 720 and captures CUDA graphs up to the same 720, graphs being per rank.
    ranks = int(plan.inputs["tp"]) if plan.inputs["attention_dp"] else 1
    batch = math.ceil(int(plan.roofline["decode_batch"]) / ranks)
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
    shape = plan.inputs["shape"]
    if shape.get("experts"):
        options["moe_expert_parallel_size"] = int(plan.inputs["ep"])
        options["enable_attention_dp"] = bool(plan.inputs["attention_dp"])
        if engine == "pytorch":
            options["moe_config"] = {"backend": moe_backend(shape.get("model_type", ""), plan.inputs["compute_capability"],
                                                            bool(plan.inputs["attention_dp"]))}
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
