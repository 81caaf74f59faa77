"""Stage modules, one per pipeline step. Each exposes `register(subparsers)` adding its `forge`
verb (argument parsing only; heavy imports happen when the verb runs) and a `main(...)` that
reads like the stage's table of contents."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

# In pipeline order. A module listed here must exist: there are no placeholder verbs.
STAGE_MODULES: tuple[str, ...] = ("download", "benchmark_data", "calibration_set", "calibrate", "build", "baseline", "evaluate", "throughput", "gpu_compare", "report", "publish")


def registry_of_verbs() -> dict[str, Callable[[argparse._SubParsersAction], None]]:
    return {name: importlib.import_module(f"pipeline.stages.{name}").register for name in STAGE_MODULES}
