"""pipeline/cliargs.py: a stage's arguments declared once, as a dataclass the parser is built from."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cliargs import add_arguments, arg, runner
from pipeline.stages import build, calibration_set, download, gpu_compare, probe, report, throughput


@dataclass(frozen=True)
class Example:
    recipe_path: Path = arg(positional="recipe", help="the recipe")
    out_dir: Path = arg(required=True, flag="out")
    mode: str = arg("auto", choices=("auto", "never"))
    limit: int | None = arg()
    strict: bool = arg(False)


def test_parser_is_built_from_the_fields_and_main_gets_them_by_name():
    seen = {}
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    parser.set_defaults(func=runner(Example, lambda **kw: seen.update(kw) or 0))
    args = parser.parse_args(["r.yaml", "--out", "o", "--limit", "3", "--strict"])
    assert args.func(args) == 0
    assert seen == {"recipe_path": Path("r.yaml"), "out_dir": Path("o"), "mode": "auto", "limit": 3, "strict": True}
    with pytest.raises(SystemExit):
        parser.parse_args(["r.yaml"])  # --out is required
    with pytest.raises(SystemExit):
        parser.parse_args(["r.yaml", "--out", "o", "--mode", "sometimes"])


@pytest.mark.parametrize("module, spec", [
    (build, build.BuildArgs), (throughput, throughput.ThroughputArgs), (download, download.DownloadArgs),
    (calibration_set, calibration_set.CalibrationSetArgs), (gpu_compare, gpu_compare.GpuCompareArgs),
    (probe, probe.ProbeArgs), (report, report.ReportArgs),
])
def test_every_field_is_a_parameter_of_the_stage_main(module, spec):
    params = inspect.signature(module.main).parameters
    assert {f.name for f in dataclasses.fields(spec)} == set(params)
