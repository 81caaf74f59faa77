"""GPU ceilings measured here (`forge probe`): copy bandwidth and dense BF16 / FP8 GEMM rates from a
torch probe, saved per GPU SKU under recipes/measured/, and read back as the planner's ceilings.
torch is imported inside the probe functions only.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.core.errors import ForgeError, RecipeError
from pipeline.core.formats import FORMATS, ComputeCapability
from pipeline.core.gpus import GpuSpec
from pipeline.core.local_gpu import match_sku
from pipeline.sizing.roofline import Ceilings

log = logging.getLogger(__name__)

DEFAULT_MEASURED_DIR = Path("recipes/measured")
PROBE_SCHEMA = "forge.probe/1"
# FP8 tensor cores arrive with Ada (SM 8.9) and Hopper (SM 9.0): the fp8 format's floor, from the registry.
FP8_MIN_COMPUTE_CAPABILITY = FORMATS["fp8"].min_compute_capability


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
    plateau on Hopper (measured here 2026-11: ~798 TFLOP/s BF16 on one H100, ~790 on one H200 at this size).
    """
    import torch

    from pipeline.core.files import now_iso

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
    """The catalog key for an NVML/CUDA device name (pipeline.core.local_gpu.match_sku's rules)."""
    return match_sku(device_name, {key: spec.nvml_names for key, spec in catalog.items()})


def gpu_key_for(device_name: str, catalog: Mapping[str, GpuSpec]) -> str:
    key = match_gpu_key(device_name, catalog)
    if key is None:
        names = "; ".join(f"{k}: {', '.join(s.nvml_names)}" for k, s in catalog.items())
        raise RecipeError(
            "GPU catalog",
            f"GPU {device_name!r} is not in the catalog (known: {names}).",
            "add it to pipeline/core/data/gpus.yaml with its NVML name under nvml_names, then re-run `forge probe`.",
        )
    return key


def save_probe(result: ProbeResult, catalog: Mapping[str, GpuSpec], out_dir: Path = DEFAULT_MEASURED_DIR) -> Path:
    """Write `<out_dir>/<gpu-key>.json`; refuses a GPU the catalog does not know, or one whose
    compute capability disagrees with the catalog entry it matched."""
    key = gpu_key_for(result.gpu_name, catalog)
    expected = catalog[key].compute_capability
    if ComputeCapability.parse(expected) != ComputeCapability.parse(result.compute_capability):
        raise RecipeError(
            f"pipeline/core/data/gpus.yaml: gpus.{key}",
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
    from pipeline.core.formats import FORMATS

    return load_ceilings(gpu_key, FORMATS[format_name].compute_dtype, measured_dir)
