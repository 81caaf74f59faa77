"""trtllm-bench's inputs and outputs: the seeded synthetic dataset it reads, the throughput / latency
command lines, and the parsed --report_json (pipeline/measure/bench.py runs them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import ForgeError, StageInputError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- trtllm-bench


@dataclass(frozen=True)
class BenchDataset:
    path: Path
    num_requests: int
    input_len: int
    output_len: int
    seed: int
    vocab_size: int
    sha256: str


def _token_pool(tokenizer_or_vocab_size: Any) -> tuple[int, set[int]]:
    if isinstance(tokenizer_or_vocab_size, int):
        return tokenizer_or_vocab_size, set()
    tokenizer = tokenizer_or_vocab_size
    # len() counts added special tokens; `vocab_size` on HF tokenizers does not.
    return len(tokenizer), set(getattr(tokenizer, "all_special_ids", ()) or ())


def make_bench_dataset(
    tokenizer_or_vocab_size: Any,
    num_requests: int,
    input_len: int,
    output_len: int,
    seed: int,
    path: Path,
) -> BenchDataset:
    """Write the JSONL trtllm-bench reads: one `{"task_id", "input_ids", "output_tokens"}` per line.

    Format: TensorRT-LLM tensorrt_llm/bench/utils/data.py `create_dataset_from_stream` takes
    `input_ids` (or a `prompt` it tokenizes), requires `task_id` and `output_tokens`; its own
    synthetic generator (tensorrt_llm/bench/dataset/utils.py `generate_text_dataset`) writes the
    same three keys. Prompts are uniformly random token ids without special tokens (no EOS/BOS
    inside a prompt), fixed lengths so the run matches the recipe's input/output lengths.
    `throughput` runs with `--eos_id -1` by default, so every request generates `output_len` tokens.
    """
    for name, value in (("num_requests", num_requests), ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ForgeError("make_bench_dataset", f"{name} must be >= 1, got {value}.", f"pass a positive {name}.")
    vocab_size, special = _token_pool(tokenizer_or_vocab_size)
    if vocab_size - len(special) < 2:
        raise ForgeError("make_bench_dataset", f"vocabulary of {vocab_size} has too few ordinary tokens.",
                         "pass the model's tokenizer or its vocab_size.")
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "w") as handle:
        for task_id in range(num_requests):
            ids: list[int] = []
            while len(ids) < input_len:
                token = rng.randrange(vocab_size)
                if token not in special:
                    ids.append(token)
            line = json.dumps({"task_id": task_id, "input_ids": ids, "output_tokens": output_len},
                              separators=(",", ":")) + "\n"
            handle.write(line)
            digest.update(line.encode())
    return BenchDataset(path, num_requests, input_len, output_len, seed, vocab_size, digest.hexdigest())


@dataclass(frozen=True)
class BenchCommand:
    mode: str  # "throughput" or "latency"
    argv: tuple[str, ...]
    report_json: Path
    tp: int


def bench_commands(
    model_name: str,
    bundle_dir: Path,
    dataset: Path,
    options_file: Path | None,
    tp: int,
    report_dir: Path,
    workspace: Path,
    concurrency: int | None = None,
    num_requests: int | None = None,
    warmup: int = 2,
    latency_extra_options: bool = True,
) -> tuple[BenchCommand, ...]:
    """The `trtllm-bench ... throughput` and `... latency` argument lists for one bundle.

    Options as declared in TensorRT-LLM tensorrt_llm/commands/bench.py (group: --model, --model_path,
    --workspace) and tensorrt_llm/bench/benchmark/{throughput,low_latency}.py (--dataset, --backend,
    --extra_llm_api_options, --tp, --concurrency, --num_requests, --warmup, --report_json;
    throughput also --streaming). Notes from that source:
      * --model_path given: no Hub download (`snapshot_download` only when checkpoint_path is None);
        --model still names the HF model, which the report records.
      * --workspace defaults to /tmp; forge passes its own directory.
      * throughput reports TTFT/TPOT percentiles only with --streaming (ReportUtility
        `streaming_metrics`); latency always streams and runs batch 1.
      * latency gained --extra_llm_api_options (alias --config) during the 1.2 line; 1.2.0rc builds
        lack it, hence `latency_extra_options=False` for those.
    """
    top = ("trtllm-bench", "--model", model_name, "--model_path", str(bundle_dir), "--workspace", str(workspace))
    report_dir = Path(report_dir)
    commands = []
    for mode in ("throughput", "latency"):
        report = report_dir / f"trtllm_bench_{mode}.json"
        args = [mode, "--dataset", str(dataset), "--backend", "pytorch"]
        if options_file is not None and (mode == "throughput" or latency_extra_options):
            args += ["--extra_llm_api_options", str(options_file)]
        args += ["--tp", str(tp), "--warmup", str(warmup)]
        if num_requests is not None:
            args += ["--num_requests", str(num_requests)]
        if mode == "throughput":
            args.append("--streaming")
            if concurrency is not None:
                args += ["--concurrency", str(concurrency)]
        args += ["--report_json", str(report)]
        commands.append(BenchCommand(mode, top + tuple(args), report, tp))
    return tuple(commands)


PERCENTILE_KEYS = ("minimum", "maximum", "average", "p50", "p90", "p95", "p99")


@dataclass(frozen=True)
class BenchReport:
    """The numbers forge keeps from a trtllm-bench `--report_json` file (all measured)."""

    request_throughput_req_s: float
    output_tok_s: float  # all GPUs of the run
    output_tok_s_per_gpu: float
    total_tok_s: float  # input + output
    output_tok_s_per_user: float  # mean per-request output throughput, first token included
    total_latency_ms: float
    request_latency_ms: dict[str, float]
    ttft_ms: dict[str, float] | None  # percentiles; None when the run did not stream
    tpot_ms: dict[str, float] | None
    avg_ttft_ms: float | None
    avg_tpot_ms: float | None
    per_user_output_speed_tok_s: float | None  # generation phase only (excludes TTFT)
    num_requests: int
    avg_input_length: float
    avg_output_length: float
    avg_concurrency: float
    tp_size: int
    world_size: int
    engine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _need(section: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in section or section[key] is None:
        raise StageInputError(
            where,
            f"trtllm-bench report has no '{key}'.",
            "re-run trtllm-bench with --report_json (TensorRT-LLM 1.2.x schema); see pipeline/measure/bench.py.",
        )
    return section[key]


def _percentiles(section: Mapping[str, Any] | None) -> dict[str, float] | None:
    if not section:
        return None
    return {k: float(section[k]) for k in PERCENTILE_KEYS if k in section}


def parse_bench_report(report: Mapping[str, Any] | Path) -> BenchReport:
    """Parse trtllm-bench's `--report_json`.

    Schema: TensorRT-LLM tensorrt_llm/bench/dataclasses/reporting.py `ReportUtility.get_statistics_dict`
    (1.2 line): sections `engine`, `world_info`, `request_info`, `performance` (always) and
    `streaming_metrics` (only for streamed runs: throughput --streaming, and latency). Latency
    percentiles are dicts keyed minimum/maximum/average/p50/p90/p95/p99 in ms.
    """
    where = "trtllm-bench report"
    if isinstance(report, (str, Path)):
        where = str(report)
        try:
            report = json.loads(Path(report).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StageInputError(where, f"cannot read the report ({exc}).", "re-run trtllm-bench with --report_json.") from None
    perf = _need(report, "performance", where)
    requests = _need(report, "request_info", where)
    world = _need(report, "world_info", where)
    streaming = report.get("streaming_metrics") or {}
    return BenchReport(
        request_throughput_req_s=float(_need(perf, "request_throughput_req_s", where)),
        output_tok_s=float(_need(perf, "system_output_throughput_tok_s", where)),
        output_tok_s_per_gpu=float(_need(perf, "output_throughput_per_gpu_tok_s", where)),
        total_tok_s=float(_need(perf, "system_total_throughput_tok_s", where)),
        output_tok_s_per_user=float(_need(perf, "output_throughput_per_user_tok_s", where)),
        total_latency_ms=float(_need(perf, "total_latency_ms", where)),
        request_latency_ms=_percentiles(perf.get("request_latency_percentiles_ms")) or {},
        ttft_ms=_percentiles(streaming.get("ttft_percentiles")),
        tpot_ms=_percentiles(streaming.get("tpot_percentiles")),
        avg_ttft_ms=float(streaming["avg_ttft_ms"]) if "avg_ttft_ms" in streaming else None,
        avg_tpot_ms=float(streaming["avg_tpot_ms"]) if "avg_tpot_ms" in streaming else None,
        per_user_output_speed_tok_s=float(streaming["token_output_speed_tok_s"])
        if "token_output_speed_tok_s" in streaming
        else None,
        num_requests=int(_need(requests, "num_requests", where)),
        avg_input_length=float(_need(requests, "avg_input_length", where)),
        avg_output_length=float(_need(requests, "avg_output_length", where)),
        avg_concurrency=float(requests.get("avg_num_concurrent_requests") or 0.0),
        tp_size=int(_need(world, "tp_size", where)),
        world_size=int(_need(world, "world_size", where)),
        engine={k: v for k, v in (report.get("engine") or {}).items()
                if k in ("model", "model_path", "version", "backend", "dtype", "kv_cache_dtype", "quantization")},
    )
