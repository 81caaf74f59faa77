"""`forge probe`: measure this GPU's copy bandwidth and dense BF16 / FP8 GEMM rates, and store them
per GPU SKU so `forge plan` can predict from measured ceilings instead of datasheet values."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.measure.probe import DEFAULT_MEASURED_DIR, cuda_device_name, gpu_key_for, probe_gpu, save_probe

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  forge probe                                   # GPU 0 -> recipes/measured/<gpu>.json
  forge probe --device 1 --out-dir /tmp/probes  # another GPU, another directory
  forge probe --json                            # also print the result as JSON
"""


@dataclass(frozen=True)
class ProbeArgs:
    """`forge probe`'s arguments, declared once (pipeline/core/cliargs.py)."""

    device: int = arg(0, help="CUDA device index (default: %(default)s)")
    out_dir: Path = arg(DEFAULT_MEASURED_DIR, help="where <gpu>.json goes (default: %(default)s)")
    catalog_path: Path = arg(DEFAULT_CATALOG, flag="catalog", help="GPU catalog (default: %(default)s)")
    as_json: bool = arg(False, flag="json", help="print the stored result as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    add_verb(subparsers, "probe", runner(ProbeArgs, main),
             help="measure HBM copy bandwidth and BF16/FP8 GEMM rates on a CUDA GPU (for measured ceilings)",
             epilog=EXAMPLES)


def main(device: int, out_dir: Path, catalog_path: Path, as_json: bool = False) -> int:
    catalog = load_catalog(catalog_path)
    # Refuse before measuring: no CUDA, or a GPU the catalog cannot name, costs no probe time.
    key = gpu_key_for(cuda_device_name(device), catalog)
    log.info("probing CUDA device %d (%s)", device, key)
    result = probe_gpu(device)
    path = save_probe(result, catalog, out_dir)
    spec = catalog[key]
    print(f"{result.gpu_name} (compute capability {result.compute_capability}) -> {path}")
    print(f"  copy bandwidth  {result.copy_bandwidth_bytes_per_s / 1e12:6.2f} TB/s  "
          f"(datasheet {spec.memory_bandwidth_bytes_per_s / 1e12:.2f}, "
          f"{result.copy_bandwidth_bytes_per_s / spec.memory_bandwidth_bytes_per_s:.0%})")
    print(f"  BF16 GEMM       {result.bf16_tflops:6.0f} TFLOP/s (datasheet {spec.tflops['bf16']:.0f}, "
          f"{result.bf16_tflops / spec.tflops['bf16']:.0%})")
    if result.fp8_tflops is not None and "fp8" in spec.tflops:
        print(f"  FP8 GEMM        {result.fp8_tflops:6.0f} TFLOP/s (datasheet {spec.tflops['fp8']:.0f}, "
              f"{result.fp8_tflops / spec.tflops['fp8']:.0%})")
    else:
        print(f"  FP8 GEMM        not measured ({result.method['fp8'].get('skipped', 'no datasheet rate')})")
    if as_json:
        print(json.dumps({"gpu": key, **result.to_json()}, indent=2))
    return 0
