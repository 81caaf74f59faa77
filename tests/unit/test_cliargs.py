"""pipeline/core/cliargs.py: a stage's arguments declared once, as a dataclass the parser is built from."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.core.cliargs import add_arguments, arg, from_namespace, included, run_with, runner
from pipeline.stages import build, calibrate, calibration_set, download, gpu_compare, report, throughput
from pipeline.verbs import probe


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
    (probe, probe.ProbeArgs), (report, report.ReportArgs), (calibrate, calibrate.CalibrateArgs),
])
def test_every_field_is_a_parameter_of_the_stage_main(module, spec):
    params = inspect.signature(module.main).parameters
    assert {f.name for f in dataclasses.fields(spec)} == set(params)


def _verb_parsers():
    from pipeline import cli

    parser = cli.build_parser(cli.stage_verbs())
    found = {}

    def walk(p, prefix):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[" ".join(prefix)] = p
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*prefix, name])

    walk(parser, [])
    return found


def test_every_verb_runs_through_a_spec_whose_fields_are_its_arguments():
    for verb, parser in _verb_parsers().items():
        func = parser.get_default("func")
        spec = getattr(func, "spec", None)
        assert spec is not None and dataclasses.is_dataclass(spec), f"forge {verb}: its parser is hand-written"
        dests = {a.dest for a in parser._actions if a.dest not in ("help", "debug", "verbose")}
        assert dests == _leaf_fields(spec), f"forge {verb}: arguments declared outside its spec"
        defaults = argparse.Namespace(**{a.dest: a.default for a in parser._actions})
        assert isinstance(from_namespace(spec, _filled(parser, defaults)), spec), verb


def _leaf_fields(spec) -> set[str]:
    hints = typing.get_type_hints(spec)
    return set().union(*({f.name} if not dataclasses.is_dataclass(hints[f.name]) else _leaf_fields(hints[f.name])
                         for f in dataclasses.fields(spec)))


def _filled(parser, namespace):
    """The defaults, with a value of the right type for each required argument."""
    for a in parser._actions:
        if a.required:
            setattr(namespace, a.dest, (a.type or str)("1" if a.type in (int, float) else "x"))
    return namespace


@dataclass(frozen=True)
class Shared:
    registry: str | None = arg()
    catalog: Path = arg(Path("c.yaml"))


@dataclass(frozen=True, kw_only=True)
class WithGroups:
    target: str = arg(positional="target")
    version: str | None = arg(group="which")
    stage: str | None = arg(group="which")
    gpu: tuple[str, ...] | None = arg(metavar="GPU")
    link: tuple[str, ...] = arg(())
    where: Shared = included(Shared)


def test_included_specs_repeated_options_and_exclusive_groups():
    parser = argparse.ArgumentParser()
    add_arguments(parser, WithGroups)
    parser.set_defaults(func=run_with(WithGroups, lambda values: values))
    args = parser.parse_args(["t", "--gpu", "a", "--gpu", "b", "--registry", "r"])
    values = from_namespace(WithGroups, args)
    assert values == WithGroups(target="t", gpu=("a", "b"), where=Shared(registry="r"))
    assert from_namespace(WithGroups, parser.parse_args(["t"])).link == ()  # never a shared list
    with pytest.raises(SystemExit):
        parser.parse_args(["t", "--version", "v1", "--stage", "prod"])  # not both


def test_a_value_of_the_wrong_type_fails():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    with pytest.raises(SystemExit):
        parser.parse_args(["r.yaml", "--out", "o", "--limit", "three"])
    args = parser.parse_args(["r.yaml", "--out", "o"])
    args.limit = "3"  # as a hand-built namespace (or a wrong default) would pass it
    with pytest.raises(TypeError, match=r"Example.limit: expected int, got '3'"):
        from_namespace(Example, args)
    args.limit, args.strict = 3, "yes"
    with pytest.raises(TypeError, match="Example.strict: expected bool"):
        from_namespace(Example, args)


def test_an_unsupported_annotation_is_refused_when_the_parser_is_built():
    @dataclass(frozen=True)
    class Bad:
        options: dict = arg()

    with pytest.raises(TypeError, match="unsupported argument type"):
        add_arguments(argparse.ArgumentParser(), Bad)


def test_pull_list_and_publish_share_one_declaration_of_the_registry_options():
    from pipeline.registry.args import RegistryArgs, RegistryLocation
    from pipeline.stages import publish
    from pipeline.verbs import listing, promote, pull

    for spec in (pull.PullArgs, listing.ListArgs, publish.PublishArgs):
        hints = typing.get_type_hints(spec)
        assert [f.name for f in dataclasses.fields(spec) if hints[f.name] is RegistryArgs] == ["where"]
        assert not {"registry", "timeout_s", "catalog"} & {f.name for f in dataclasses.fields(spec)}
    # promote reaches a registry but judges no GPU: the registry and its deadline, the same declaration
    assert typing.get_type_hints(promote.PromoteArgs)["where"] is RegistryLocation
    assert typing.get_type_hints(RegistryArgs)["at"] is RegistryLocation
