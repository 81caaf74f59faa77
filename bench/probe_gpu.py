"""Print `forge probe`'s measurement of one CUDA GPU as JSON, without writing anything.

    python bench/probe_gpu.py [--device N] [--gemm-size 8192] [--copy-mib 1024]

For a device run: compare with the datasheet rates in pipeline/core/data/gpus.yaml (measured here 2026-11 on one
H100: copy ~3.0 TB/s, BF16 8192^3 ~798 TFLOP/s; on one H200: ~4.3 TB/s, ~790 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.errors import ForgeError
    from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
    from pipeline.measure.probe import match_gpu_key, probe_gpu

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--gemm-size", type=int, default=8192)
    parser.add_argument("--copy-mib", type=int, default=1024)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    args = parser.parse_args(argv)
    try:
        result = probe_gpu(args.device, copy_bytes=args.copy_mib << 20, gemm_size=args.gemm_size,
                           repetitions=args.repetitions)
    except ForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = result.to_json()
    catalog = load_catalog(args.catalog) if args.catalog.is_file() else {}
    key = match_gpu_key(result.gpu_name, catalog) if catalog else None
    out["catalog_key"] = key
    if key is not None:
        spec = catalog[key]
        out["fraction_of_datasheet"] = {
            "copy_bandwidth": result.copy_bandwidth_bytes_per_s / spec.memory_bandwidth_bytes_per_s,
            "bf16": result.bf16_tflops / spec.tflops["bf16"],
            "fp8": None if result.fp8_tflops is None or "fp8" not in spec.tflops
            else result.fp8_tflops / spec.tflops["fp8"],
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    # Run as a file from the repository root (python bench/probe_gpu.py) without installing forge.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
