"""The options file and commands for the shipped recipes hold the planner's numbers, and every
option name is one the pinned TensorRT-LLM (1.2.1) accepts.

Accepted names: tensorrt_llm/llmapi/llm_args.py (NVIDIA/TensorRT-LLM, 1.2 line; see the tables
and their provenance in pipeline/serving/trtllm_options.py). Expected KV numbers for Llama-3.3-70B are computed by
hand here, from config.json and TensorRT-LLM's own arithmetic (cited below), never by calling the planner."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pipeline.core.errors import ForgeError
from pipeline.core.formats import ComputeCapability
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.planning.targets import plan_target
from pipeline.planning.validate import check_target
from pipeline.recipe.loading import discover_recipes, load_recipe
from pipeline.serving.serve_commands import instance_memory_fraction, serve_commands
from pipeline.serving.trtllm import LocalRuntime, check_engine_environment
from pipeline.serving.trtllm_options import (
    CUDA_GRAPH_CONFIG_FIELDS,
    KV_CACHE_CONFIG_FIELDS,
    TORCH_LLM_ARGS_FIELDS,
    TRT_LLM_ARGS_FIELDS,
    cuda_graph_batch_sizes,
    llm_api_options,
    unknown_option_names,
)

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(DEFAULT_CATALOG)

# The real recipes the issue names: Llama-3.1-8B and 3.3-70B on H200 (FP8) and B200 (NVFP4).
SHIPPED = [
    ("llama-3-1-8b-instruct/fp8.yaml", "h200"),
    ("llama-3-1-8b-instruct/nvfp4.yaml", "b200"),
    ("llama-3-3-70b-instruct/fp8.yaml", "h200"),
    ("llama-3-3-70b-instruct/nvfp4.yaml", "b200"),
]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes load by relative path, as under DVC


def _options(rel: str, gpu: str, engine: str = "pytorch"):
    recipe = load_recipe(Path("recipes") / rel)
    plan = check_target(recipe, gpu, CATALOG)
    target = recipe.spec.targets[gpu]
    return recipe, plan, target, llm_api_options(plan, target, recipe.spec.quant.format, recipe.spec.quant.kv_cache_dtype, engine)


@pytest.mark.parametrize("rel,gpu", SHIPPED)
def test_shipped_options_hold_the_planners_numbers(rel, gpu):
    recipe, _, target, options = _options(rel, gpu)
    # `forge plan` computes the same plan (plan_target is what cmd_plan prints).
    forge_plan = plan_target(recipe, gpu, CATALOG).to_json()
    assert options["tensor_parallel_size"] == forge_plan["inputs"]["tp"] == target.tp
    assert options["max_seq_len"] == forge_plan["inputs"]["seq_len"] == 8192
    assert options["max_input_len"] == 1024
    # Limits sized to the recipe's ISL/OSL by the throughput model, within the recipe's caps
    # (max_num_tokens 8192, concurrency 256) and the KV pool at ISL + OSL per request.
    sized = forge_plan["throughput"]
    assert options["max_num_tokens"] == sized["max_num_tokens"] == forge_plan["inputs"]["max_num_tokens"] <= 8192
    kv_requests = forge_plan["kv_capacity_tokens"] // 32 // (2048 // 32)
    assert options["max_batch_size"] == forge_plan["decode_batch"] == sized["max_batch_size"] <= min(kv_requests, 256)
    assert options["enable_chunked_prefill"] is True  # the model schedules prompts in chunks
    kv = options["kv_cache_config"]
    assert kv == {"max_tokens": forge_plan["kv_capacity_tokens"], "free_gpu_memory_fraction": 0.9,
                  "tokens_per_block": 32, "dtype": "fp8"}
    graphs = options["cuda_graph_config"]
    assert graphs["batch_sizes"][-1] == options["max_batch_size"]
    assert graphs["enable_padding"] is True


def test_llama_70b_fp8_h200_kv_budget_by_hand():
    _, _, _, options = _options("llama-3-3-70b-instruct/fp8.yaml", "h200")
    weights = 72_656_371_712  # FP8 Linear + BF16 embeddings/lm_head/norms (test_sizing.py, ~72.6 GB by hand)
    tokens = options["max_num_tokens"]
    assert tokens == 2048  # the throughput model's choice for 1024/1024 on one H200
    # TensorRT-LLM's own arithmetic (tensorrt_llm/_torch/pyexecutor/_util.py, KvCacheCreator._cal_max_memory):
    # (total memory - peak of the profiling run) x free_gpu_memory_fraction, total as the driver
    # reports it (143,771 MiB on an H200), peak = weights + runtime + one step's activations.
    peak = weights + 2**30 + tokens * (2 * 8192 + 2 * 28672) * 2
    pool = int((143_771 * 2**20 - peak) * 0.9)
    blocks = pool // (160 * 1024 * 32)  # FP8 KV: 160 KiB per token, 32 tokens per block
    assert options["kv_cache_config"]["max_tokens"] == blocks * 32 == 421_440  # 16% above the 141e9-based 362,880
    # A 1024+1024 request reserves 64 blocks: the KV pool admits 205 at once, under the 256 concurrency.
    assert options["max_batch_size"] == blocks // 64 == 205
    assert options["cuda_graph_config"]["batch_sizes"] == [1, 2, 4, 8, 16, 32, 64, 128, 205]


def test_llama_8b_fp8_h200_batch_is_sized_to_the_workload_not_max_seq_len():
    _, plan, _, options = _options("llama-3-1-8b-instruct/fp8.yaml", "h200")
    # 8B FP8: 32 layers x 8 KV heads x 128 x 2 (K,V) x 1 byte = 64 KiB per token.
    assert plan.kv_bytes_per_token == 64 * 1024
    # Every sequence at max_seq_len 8192 would cap the batch at KV / 8192; requests of 1024 + 1024
    # admit ~4x more, so the recipe's concurrency (256) is the cap.
    assert options["kv_cache_config"]["max_tokens"] // 8192 < 256 < options["kv_cache_config"]["max_tokens"] // 2048
    assert options["max_batch_size"] == 256


@pytest.mark.parametrize("engine", ["pytorch", "tensorrt"])
def test_every_shipped_target_writes_only_accepted_names(engine):
    checked = 0
    for path in discover_recipes(Path("recipes")):
        recipe = load_recipe(path)
        for gpu in recipe.spec.targets:
            plan = check_target(recipe, gpu, CATALOG)
            options = llm_api_options(plan, recipe.spec.targets[gpu], recipe.spec.quant.format,
                                      recipe.spec.quant.kv_cache_dtype, engine)
            assert unknown_option_names(options, engine) == [], f"{path} {gpu}"
            assert set(options) <= (TORCH_LLM_ARGS_FIELDS if engine == "pytorch" else TRT_LLM_ARGS_FIELDS)
            assert set(options["kv_cache_config"]) <= KV_CACHE_CONFIG_FIELDS
            checked += 1
    assert checked >= 8  # every shipped recipe x target


def test_accepted_name_tables_match_the_pinned_source():
    # Spot checks of tensorrt_llm/llmapi/llm_args.py (1.2 line): fields forge relies on exist ...
    for name in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len", "tensor_parallel_size",
                 "kv_cache_config", "enable_iter_perf_stats", "cuda_graph_config"):
        assert name in TORCH_LLM_ARGS_FIELDS
    assert {"max_tokens", "free_gpu_memory_fraction", "max_gpu_total_bytes", "dtype", "tokens_per_block"} <= KV_CACHE_CONFIG_FIELDS
    assert CUDA_GRAPH_CONFIG_FIELDS == {"batch_sizes", "max_batch_size", "enable_padding"}
    # ... and names that are *not* LLM-API fields are not in the tables: trtllm-serve's CLI spells
    # it kv_cache_free_gpu_memory_fraction, the LLM API nests it; TrtLlmArgs has no CUDA graphs.
    assert "kv_cache_free_gpu_memory_fraction" not in TORCH_LLM_ARGS_FIELDS
    assert "cuda_graph_config" not in TRT_LLM_ARGS_FIELDS
    assert "build_config" not in TORCH_LLM_ARGS_FIELDS


def test_unknown_names_are_reported_with_their_section():
    options = {"max_batch_size": 8, "max_batch": 8, "kv_cache_config": {"max_tokens": 64, "fraction": 0.5},
               "cuda_graph_config": {"batch_sizes": [1], "padding": True}}
    assert unknown_option_names(options) == ["cuda_graph_config.padding", "kv_cache_config.fraction", "max_batch"]
    assert unknown_option_names({"cuda_graph_config": {}}, engine="tensorrt") == ["cuda_graph_config"]


def test_engine_options_leave_kv_dtype_and_cuda_graphs_to_the_engine():
    _, plan, _, options = _options("llama-3-3-70b-instruct/fp8.yaml", "h200", engine="tensorrt")
    # TrtLlmArgs.validate_kv_cache_dtype asserts dtype == "auto"; TrtLlmArgs has no cuda_graph_config.
    assert "dtype" not in options["kv_cache_config"]
    assert "cuda_graph_config" not in options
    assert options["kv_cache_config"]["max_tokens"] == plan.kv_capacity_tokens


@pytest.mark.parametrize("batch,expected", [(1, [1]), (2, [1, 2]), (44, [1, 2, 4, 8, 16, 32, 44]),
                                            (256, [1, 2, 4, 8, 16, 32, 64, 128, 256])])
def test_cuda_graph_batch_sizes(batch, expected):
    assert cuda_graph_batch_sizes(batch) == expected


def test_serve_commands_carry_the_same_numbers():
    _, plan, _, options = _options("llama-3-3-70b-instruct/nvfp4.yaml", "b200")
    commands = serve_commands(options, plan, "meta-llama/Llama-3.3-70B-Instruct")
    assert commands.trtllm_serve == ["trtllm-serve", "checkpoint", "--backend", "pytorch", "--tp_size", "1",
                                     "--extra_llm_api_options", "llm_api_options.yaml"]
    bench = commands.trtllm_bench
    assert bench[:5] == ["trtllm-bench", "--model", "meta-llama/Llama-3.3-70B-Instruct", "--model_path", "checkpoint"]
    assert bench[bench.index("--extra_llm_api_options") + 1] == "llm_api_options.yaml"
    ds = commands.bench_dataset
    assert ds[ds.index("--input-mean") + 1] == "1024" and ds[ds.index("--output-mean") + 1] == "1024"
    vllm = commands.vllm_serve
    assert vllm[vllm.index("--max-num-seqs") + 1] == str(options["max_batch_size"]) == "256"  # the recipe's concurrency cap; KV admits ~400 requests of 1024+1024
    assert vllm[vllm.index("--max-model-len") + 1] == "8192"
    assert vllm[vllm.index("--kv-cache-dtype") + 1] == "fp8"
    sglang = commands.sglang_serve
    assert sglang[sglang.index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    assert sglang[sglang.index("--max-running-requests") + 1] == "256"
    # Whole-card share: weights + reserve + KV pool over the 183,359 MiB the driver reports, rounded down.
    used = plan.weights_bytes_per_gpu + plan.reserve_bytes + plan.kv_pool_bytes
    assert commands.memory_fraction == instance_memory_fraction(plan) == int(100 * used / (183_359 * 2**20)) / 100
    assert 0.5 < commands.memory_fraction < 1
    assert commands.to_json()["trtllm_serve"]["shell"] == shlex.join(commands.trtllm_serve)


def test_engine_path_refused_without_gpu_and_tensorrt_llm():
    cpu = LocalRuntime(tensorrt_llm_version=None, cuda_compute_capability=None, trtllm_build=None)
    with pytest.raises(ForgeError) as info:
        check_engine_environment(cpu, ComputeCapability(9, 0), "r.yaml: build.engine")
    text = str(info.value)
    assert text.startswith("r.yaml: build.engine: engine: tensorrt builds a TensorRT engine, which needs a CUDA GPU, tensorrt_llm")
    assert "nvcr.io/nvidia/tensorrt-llm/release:1.2.x" in text and "build.engine: pytorch" in text


def test_engine_path_refuses_tensorrt_llm_1_3():
    gpu = LocalRuntime(tensorrt_llm_version="1.3.0rc5", cuda_compute_capability="9.0", trtllm_build="/usr/bin/trtllm-build")
    with pytest.raises(ForgeError, match=r"tensorrt_llm <= 1.2 \(installed: 1.3.0rc5; 1.3 removed trtllm-build\)"):
        check_engine_environment(gpu, ComputeCapability(9, 0), "r.yaml")
    ok = LocalRuntime(tensorrt_llm_version="1.2.1", cuda_compute_capability="9.0", trtllm_build="/usr/bin/trtllm-build")
    check_engine_environment(ok, ComputeCapability(9, 0), "r.yaml")  # no error


def test_build_stage_imports_neither_tensorrt_llm_nor_torch():
    # tensorrt_llm's import needs the GPU stack (its _common.py loads NVML); torch costs seconds on `forge --help`.
    import subprocess
    import sys

    code = "import sys, pipeline.stages.build; print(sorted(m for m in ('torch', 'tensorrt_llm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
