"""The arguments `forge baseline` and `forge evaluate` share, declared once (pipeline/core/cliargs.py):
how the engine is started and where the eval suites are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.accuracy.benchmarks import BENCHMARKS_DIR
from pipeline.accuracy.suites import EVAL_DIR
from pipeline.core.cliargs import arg
from pipeline.serving.server import DEFAULT_SERVE_PYTHON, READY_TIMEOUT_S


@dataclass(frozen=True)
class ServeArgs:
    """How baseline `--serve` and evaluate `--bundle` start the engine (both verbs include these)."""

    serve_python: Path = arg(DEFAULT_SERVE_PYTHON,
                             help="the serving venv's python, with vLLM (default: %(default)s, from `make serve-env`)")
    ready_timeout: float = arg(READY_TIMEOUT_S, help="seconds to wait for the engine to answer (default: %(default)s)")


@dataclass(frozen=True)
class SuiteArgs:
    """Where the eval suites are and how much of them to run (both verbs include these)."""

    eval_dir: Path = arg(EVAL_DIR, help="holds suites/ and tasks/ (default: %(default)s)")
    limit: int | None = arg(help="at most N documents per task (smoke runs); baseline and evaluate must agree")
    benchmarks: Path = arg(BENCHMARKS_DIR, help="the installed benchmark data an `installed` suite reads "
                                               "(`forge benchmark-data`; default: %(default)s)")
