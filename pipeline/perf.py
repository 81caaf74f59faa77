"""Measured throughput: GPU ceilings (`forge probe`), trtllm-bench runs, NVML power, and the ratio of
what was measured to what the planner predicted.

Three sources of numbers, always labelled:
  predicted   the planner's roofline (pipeline/sizing.py) from datasheet or probe ceilings;
  measured    a torch probe of this GPU (copy bandwidth, dense GEMM rates), or a trtllm-bench report;
  power       NVML samples taken while a benchmark ran ("nvml"), else the catalog TDP ("tdp").
Nothing here invents a number: without trtllm-bench and a CUDA GPU, `run_bench` returns `NotRun`.

torch, pynvml and subprocesses are touched only inside the functions that need them, so this module
imports on a CPU machine without side effects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.errors import ForgeError, RecipeError, StageInputError
from pipeline.formats import ComputeCapability
from pipeline.gpu_detect import match_sku
from pipeline.gpus import GpuSpec
from pipeline.sizing import Ceilings

log = logging.getLogger(__name__)

DEFAULT_MEASURED_DIR = Path("recipes/measured")
PROBE_SCHEMA = "forge.probe/1"
# FP8 tensor cores arrive with Ada (SM 8.9) and Hopper (SM 9.0); the same floor as formats.FORMATS["fp8"].
FP8_MIN_COMPUTE_CAPABILITY = ComputeCapability(8, 9)


# ---------------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class ProbeResult:
    """What `forge probe` measured on one GPU. Rates are medians over timed repetitions."""

    gpu_name: str  # as the driver names it (torch.cuda.get_device_name == NVML name)
    compute_capability: str  # "9.0"
    copy_bandwidth_bytes_per_s: float  # device-to-device copy, read + write bytes counted
    bf16_tflops: float  # dense BF16 GEMM, 2*M*N*K FLOP per call
    fp8_tflops: float | None  # dense FP8 E4M3 GEMM (torch._scaled_mm); None below SM 8.9
    method: dict[str, Any]  # sizes, repetitions and how each rate was computed
    torch_version: str
    cuda_version: str | None
    measured_at: str  # ISO-8601 UTC

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> ProbeResult:
        names = [f.name for f in cls.__dataclass_fields__.values()]
        missing = [n for n in names if n not in data]
        if missing:
            raise RecipeError(where, f"probe result lacks {', '.join(missing)}.", "re-run `forge probe` on that GPU.")
        return cls(**{n: data[n] for n in names})


def median_rate(work: float, times_ms: Sequence[float]) -> float:
    """`work` units per second from the median of per-repetition times in milliseconds.

    The median, not the mean: a single repetition delayed by a clock ramp or another process
    should not move the ceiling the planner uses."""
    if not times_ms:
        raise ValueError("no timings")
    median_ms = statistics.median(times_ms)
    if median_ms <= 0:
        raise ValueError(f"non-positive median time {median_ms} ms")
    return work / (median_ms / 1e3)


def copy_bytes_moved(buffer_bytes: int) -> int:
    """A device-to-device copy of N bytes reads N and writes N bytes of HBM."""
    return 2 * buffer_bytes


def gemm_flops(m: int, n: int, k: int) -> int:
    """One multiply-add per (m, n, k) triple, counted as 2 FLOP (the datasheet convention)."""
    return 2 * m * n * k


def _require_cuda(torch: ModuleType, device_index: int) -> None:
    if not torch.cuda.is_available():
        raise ForgeError(
            "forge probe",
            f"no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}).",
            "run on a GPU node with an NVIDIA driver and a CUDA build of torch.",
        )
    count = torch.cuda.device_count()
    if not 0 <= device_index < count:
        raise ForgeError(
            f"--device {device_index}",
            f"this machine has {count} CUDA device(s) (indices 0..{count - 1}).",
            "pick one of those indices.",
        )


def cuda_device_name(device_index: int = 0) -> str:
    """The driver's name for a CUDA device, or the 'no CUDA GPU visible' ForgeError."""
    import torch

    _require_cuda(torch, device_index)
    return torch.cuda.get_device_name(device_index)


def _time_ms(torch: ModuleType, fn: Callable[[], Any], warmup: int, repetitions: int) -> list[float]:
    """Per-repetition GPU time of `fn` with CUDA events, after `warmup` untimed calls (clock
    ramp-up, cuBLAS heuristics and workspace allocation happen there)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repetitions):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))  # milliseconds
    return times


def probe_gpu(
    device_index: int = 0,
    copy_bytes: int = 1 << 30,
    gemm_size: int = 8192,
    repetitions: int = 20,
    warmup: int = 5,
) -> ProbeResult:
    """Measure copy bandwidth and dense BF16 / FP8 GEMM rates on one CUDA GPU with torch.

    copy: `dst.copy_(src)` over `copy_bytes` bytes; 1 GiB is far beyond any L2 (50 MB on H100), so
    the copy streams HBM. GEMM: square `gemm_size`^3; 8192 is large enough to reach the tensor-core
    plateau on Hopper (FACTS.md: ~798 TFLOP/s BF16 on H100, ~790 on H200 at this size).
    """
    import torch

    from pipeline.manifest import now_iso

    _require_cuda(torch, device_index)
    device = torch.device("cuda", device_index)
    major, minor = torch.cuda.get_device_capability(device)
    cc = ComputeCapability(major, minor)
    n = gemm_size
    method: dict[str, Any] = {
        "timer": "torch.cuda.Event per repetition; rate from the median repetition",
        "repetitions": repetitions,
        "warmup": warmup,
    }

    with torch.cuda.device(device):
        bandwidth, method["copy"] = _probe_copy(torch, device, copy_bytes, warmup, repetitions)
        bf16, method["bf16"] = _probe_bf16(torch, device, n, warmup, repetitions)
        fp8: float | None = None
        if FP8_MIN_COMPUTE_CAPABILITY <= cc:
            fp8, method["fp8"] = _probe_fp8(torch, device, n, warmup, repetitions)
        else:
            method["fp8"] = {"skipped": f"compute capability {cc} < {FP8_MIN_COMPUTE_CAPABILITY}: no FP8 tensor cores"}
        torch.cuda.empty_cache()

    return ProbeResult(
        gpu_name=torch.cuda.get_device_name(device),
        compute_capability=str(cc),
        copy_bandwidth_bytes_per_s=bandwidth,
        bf16_tflops=bf16,
        fp8_tflops=fp8,
        method=method,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        measured_at=now_iso(),
    )


def _probe_copy(torch: ModuleType, device: Any, nbytes: int, warmup: int, repetitions: int) -> tuple[float, dict]:
    src = torch.full((nbytes,), 1, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = _time_ms(torch, lambda: dst.copy_(src), warmup, repetitions)
    note = {"buffer_bytes": nbytes, "bytes_counted": "read + write (2 x buffer)", "median_ms": statistics.median(times)}
    return median_rate(copy_bytes_moved(nbytes), times), note


def _probe_bf16(torch: ModuleType, device: Any, n: int, warmup: int, repetitions: int) -> tuple[float, dict]:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    times = _time_ms(torch, lambda: torch.matmul(a, b, out=c), warmup, repetitions)
    note = {"shape": [n, n, n], "op": "torch.matmul(out=)", "median_ms": statistics.median(times)}
    return median_rate(gemm_flops(n, n, n), times) / 1e12, note


def _probe_fp8(torch: ModuleType, device: Any, n: int, warmup: int, repetitions: int) -> tuple[float, dict]:
    # torch 2.13 `_scaled_mm(input, mat2, scale_a, scale_b, bias=None, scale_result=None,
    # out_dtype=None, use_fast_accum=False)` (torch/_C/_VariableFunctions.pyi). Its checks
    # (torch/_meta_registrations.py, _check_scaled_mm_sizes): `input` row-major, `mat2`
    # column-major, and one-element float32 scales select per-tensor ("tensorwise") scaling.
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major view
    one = torch.ones((), dtype=torch.float32, device=device)
    out = {"shape": [n, n, n], "op": "torch._scaled_mm e4m3 x e4m3 -> bf16, per-tensor scales",
           "use_fast_accum": True}

    def call():
        # Fast accumulation: the FP8 GEMM mode inference kernels use for throughput; without it
        # Hopper periodically promotes partial sums to FP32, which is slower.
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)

    times = _time_ms(torch, call, warmup, repetitions)
    out["median_ms"] = statistics.median(times)
    return median_rate(gemm_flops(n, n, n), times) / 1e12, out


# ------------------------------------------------------------------------------ probe files per GPU SKU


def match_gpu_key(device_name: str, catalog: Mapping[str, GpuSpec]) -> str | None:
    """The catalog key for an NVML/CUDA device name (pipeline.gpu_detect.match_sku's rules)."""
    return match_sku(device_name, {key: spec.nvml_names for key, spec in catalog.items()})


def gpu_key_for(device_name: str, catalog: Mapping[str, GpuSpec]) -> str:
    key = match_gpu_key(device_name, catalog)
    if key is None:
        names = "; ".join(f"{k}: {', '.join(s.nvml_names)}" for k, s in catalog.items())
        raise RecipeError(
            "GPU catalog",
            f"GPU {device_name!r} is not in the catalog (known: {names}).",
            "add it to pipeline/data/gpus.yaml with its NVML name under nvml_names, then re-run `forge probe`.",
        )
    return key


def save_probe(result: ProbeResult, catalog: Mapping[str, GpuSpec], out_dir: Path = DEFAULT_MEASURED_DIR) -> Path:
    """Write `<out_dir>/<gpu-key>.json`; refuses a GPU the catalog does not know, or one whose
    compute capability disagrees with the catalog entry it matched."""
    key = gpu_key_for(result.gpu_name, catalog)
    expected = catalog[key].compute_capability
    if ComputeCapability.parse(expected) != ComputeCapability.parse(result.compute_capability):
        raise RecipeError(
            f"pipeline/data/gpus.yaml: gpus.{key}",
            f"{result.gpu_name!r} reports compute capability {result.compute_capability}, the catalog says {expected}.",
            "fix the catalog entry or its nvml_names.",
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{key}.json"
    payload = {"schema": PROBE_SCHEMA, "gpu": key, **result.to_json()}
    with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(handle.name, path)
    return path


def load_probe(gpu_key: str, measured_dir: Path = DEFAULT_MEASURED_DIR) -> ProbeResult | None:
    path = Path(measured_dir) / f"{gpu_key}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(str(path), f"not valid JSON ({exc.msg}).", f"re-run `forge probe` on a {gpu_key}.") from None
    if data.get("schema") != PROBE_SCHEMA or data.get("gpu") != gpu_key:
        raise RecipeError(
            str(path),
            f"expected schema {PROBE_SCHEMA!r} for GPU {gpu_key!r}, found {data.get('schema')!r} for {data.get('gpu')!r}.",
            f"re-run `forge probe` on a {gpu_key}.",
        )
    return ProbeResult.from_json(data, str(path))


def load_ceilings(gpu_key: str, compute_dtype: str, measured_dir: Path = DEFAULT_MEASURED_DIR) -> Ceilings | None:
    """Measured ceilings for the planner, or None when no probe exists for this GPU or the probe has
    no rate for `compute_dtype` (the torch probe measures bf16 and fp8, not fp4). None means the
    planner keeps its datasheet ceilings; one `Ceilings` never mixes the two sources."""
    probe = load_probe(gpu_key, measured_dir)
    if probe is None:
        return None
    tflops = {"bf16": probe.bf16_tflops, "fp8": probe.fp8_tflops}.get(compute_dtype)
    if tflops is None:
        log.info("probe for %s has no %s GEMM rate; using datasheet ceilings", gpu_key, compute_dtype)
        return None
    return Ceilings(probe.copy_bandwidth_bytes_per_s, tflops * 1e12, "measured")


def probe_ceilings(gpu_key: str, format_name: str, measured_dir: Path = DEFAULT_MEASURED_DIR) -> Ceilings | None:
    """`load_ceilings` for a format name: what `forge plan` passes the planner so a probe of this GPU,
    where one exists, replaces the datasheet rates in the throughput prediction and the roofline."""
    from pipeline.formats import FORMATS

    return load_ceilings(gpu_key, FORMATS[format_name].compute_dtype, measured_dir)


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
            "re-run trtllm-bench with --report_json (TensorRT-LLM 1.2.x schema); see pipeline/perf.py.",
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


# ------------------------------------------------------------------------------------------- power


@dataclass(frozen=True)
class PowerReading:
    mean_watts: float | None  # summed over the sampled GPUs; None when NVML gave nothing
    samples: int
    duration_s: float
    devices: tuple[int, ...]
    note: str = ""


class PowerSampler:
    """Samples NVML board power of some GPUs in a background thread while a run is in progress.

        with PowerSampler(devices=(0, 1)) as sampler:
            run()
        reading = sampler.reading   # mean watts summed over both GPUs

    pynvml (distribution nvidia-ml-py) is imported on start; `nvml` replaces it in tests. Without
    NVML the reading has mean_watts None and a note, and callers fall back to TDP (labelled).
    """

    def __init__(self, devices: Sequence[int] = (0,), interval_s: float = 0.1, nvml: Any = None):
        self.devices = tuple(devices)
        self.interval_s = interval_s
        self._nvml = nvml
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: list[float] = []
        self._started = 0.0
        self._note = ""
        self.reading: PowerReading | None = None

    def start(self) -> PowerSampler:
        nvml = self._nvml
        if nvml is None:
            try:
                import pynvml as nvml  # lazy: absent or driverless on CPU hosts
            except ImportError:
                self._note = "pynvml (nvidia-ml-py) not installed"
                return self
        try:
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.devices]
        except nvml.NVMLError as exc:
            self._note = f"NVML unavailable: {exc}"
            return self
        self._nvml = nvml
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, args=(nvml, handles), name="forge-power", daemon=True)
        self._thread.start()
        return self

    def _loop(self, nvml: Any, handles: list[Any]) -> None:
        while True:
            try:
                # nvmlDeviceGetPowerUsage answers milliwatts for the whole board.
                self._samples.append(sum(nvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1e3)
            except nvml.NVMLError as exc:
                self._note = f"NVML power read failed: {exc}"
                return
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> PowerReading:
        duration = 0.0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            duration = time.monotonic() - self._started
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        samples = list(self._samples)
        self.reading = PowerReading(
            mean_watts=statistics.fmean(samples) if samples else None,
            samples=len(samples),
            duration_s=duration,
            devices=self.devices,
            note=self._note or ("" if samples else "no power samples"),
        )
        return self.reading

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def energy_and_cost(
    tok_s: float,
    watts: float | None,
    tdp_watts: float,
    tp: int,
    price_per_gpu_hour: float | None,
) -> dict[str, Any]:
    """Joules per output token, GPU-hours and USD per million output tokens.

    `tok_s` is the whole run's output tok/s; `watts` the mean power of all `tp` GPUs together
    (NVML); without it every GPU is assumed at `tdp_watts`, an upper bound, and labelled "tdp".
    """
    if tok_s <= 0:
        raise ForgeError("energy_and_cost", f"throughput must be > 0 tok/s, got {tok_s}.",
                         "use the output tok/s of a benchmark that completed.")
    if tp < 1:
        raise ForgeError("energy_and_cost", f"tp must be >= 1, got {tp}.", "pass the run's TP size.")
    source = "nvml" if watts is not None else "tdp"
    power = watts if watts is not None else tdp_watts * tp
    gpu_hours_per_mtok = tp * 1e6 / (tok_s * 3600)
    return {
        "power_source": source,
        "watts": power,
        "joules_per_token": power / tok_s,
        "gpu_hours_per_mtok": gpu_hours_per_mtok,
        "usd_per_mtok": None if price_per_gpu_hour is None else price_per_gpu_hour * gpu_hours_per_mtok,
        "price_per_gpu_hour_usd": price_per_gpu_hour,
        "tp": tp,
    }


def measured_vs_predicted(measured_tok_s: float, predicted_tok_s: float) -> float:
    """measured / predicted. The roofline is a ceiling: TensorRT-LLM's published runs land near
    0.3-0.4 of it (FACTS.md), so a ratio above 1 means the prediction, not the run, is wrong."""
    if not predicted_tok_s or predicted_tok_s <= 0:
        raise ForgeError("measured_vs_predicted", f"predicted throughput must be > 0, got {predicted_tok_s}.",
                         "plan a configuration that fits (forge plan) before comparing.")
    return measured_tok_s / predicted_tok_s


# ------------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class NotRun:
    """A measurement that did not happen, and why. Never carries numbers."""

    reason: str


@dataclass(frozen=True)
class BenchRun:
    mode: str
    argv: tuple[str, ...]
    report: BenchReport
    power: PowerReading
    wall_s: float


def cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def run_bench(
    command: BenchCommand,
    which: Callable[[str], str | None] = shutil.which,
    cuda_available: Callable[[], bool] = cuda_visible,
    power_interval_s: float = 0.5,
    timeout_s: float | None = None,
    nvml: Any = None,
) -> BenchRun | NotRun:
    """Run one trtllm-bench command with NVML power sampling over its GPUs; NotRun when the
    executable or a CUDA GPU is missing. A failed run raises ForgeError with the output's tail."""
    executable = which(command.argv[0])
    if executable is None:
        return NotRun(f"{command.argv[0]} not found on PATH (TensorRT-LLM is not installed here)")
    if not cuda_available():
        return NotRun("no CUDA GPU visible")
    command.report_json.parent.mkdir(parents=True, exist_ok=True)
    log.info("running %s", " ".join(command.argv))
    started = time.monotonic()
    with PowerSampler(devices=tuple(range(command.tp)), interval_s=power_interval_s, nvml=nvml) as sampler:
        proc = subprocess.run([executable, *command.argv[1:]], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        raise ForgeError(
            f"trtllm-bench {command.mode}",
            f"exited with status {proc.returncode}: " + " | ".join(tail),
            "run the printed command by hand to see the full log; check the bundle and its options file.",
        )
    return BenchRun(command.mode, command.argv, parse_bench_report(command.report_json), sampler.reading, wall)


def measured_summary(
    run: BenchRun,
    predicted_tok_s: float | None,
    tdp_watts: float,
    price_per_gpu_hour: float | None,
) -> dict[str, Any]:
    """One labelled record per run: measured numbers, the prediction they are compared with, the
    ratio, and energy/cost. Compare throughput runs with the planner's max-batch decode rate and
    latency runs (batch 1) with its batch-1 rate."""
    report = run.report
    out: dict[str, Any] = {
        "mode": run.mode,
        "measured": report.to_json(),
        "predicted_tok_s": predicted_tok_s,
        "measured_over_predicted": None
        if not predicted_tok_s
        else measured_vs_predicted(report.output_tok_s, predicted_tok_s),
        "power": asdict(run.power),
        "energy": energy_and_cost(report.output_tok_s, run.power.mean_watts, tdp_watts, report.world_size,
                                  price_per_gpu_hour),
        "argv": list(run.argv),
        "wall_s": run.wall_s,
    }
    return out
