"""A stage's command-line arguments, declared once: a dataclass whose fields are the arguments.

    @dataclass(frozen=True)
    class BuildArgs:
        recipe_path: Path = arg(positional="recipe", help="recipes/<model>/<variant>.yaml")
        gpu: str = arg(required=True, help="a target key of the recipe")
        load_test: str = arg("auto", choices=LOAD_TEST_MODES, help="...")

    def register(sub):
        p = sub.add_parser("build", ...)
        add_arguments(p, BuildArgs)
        p.set_defaults(func=runner(BuildArgs, main))

A field is `--<name with dashes>` unless `positional=` names it; its type is the field's annotation
(Path, str, int, float, bool -> store_true; `X | None` -> optional X); `flag=` renames the option
(`--quantized` for `quantized_dir`). `runner` calls `main(**fields)`, so a field's name is the name
of main's parameter: main keeps an explicit, typed signature for tests and library callers, and
argv never reaches it. Adding a flag is one field (and main's parameter of the same name).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SCALARS = (Path, str, int, float)


def arg(default: Any = dataclasses.MISSING, *, help: str | None = None, required: bool = False,
        positional: str | None = None, flag: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """One argument: a dataclass field carrying its argparse settings."""
    meta = {"help": help, "required": required, "positional": positional, "flag": flag, "choices": choices}
    if default is dataclasses.MISSING:
        return dataclasses.field(default=None, metadata=meta) if not (required or positional) else \
            dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _scalar(annotation: Any) -> type:
    """Path | None -> Path; bool -> bool."""
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = kinds[0]
    if annotation is bool or annotation in _SCALARS:
        return annotation
    raise TypeError(f"cliargs: unsupported argument type {annotation!r}")


def add_arguments(parser: argparse.ArgumentParser, spec: type) -> None:
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        meta, kind = f.metadata, _scalar(hints[f.name])
        options: dict[str, Any] = {"dest": f.name, "help": meta.get("help")}
        if meta.get("choices"):
            options["choices"] = meta["choices"]
        if meta.get("positional"):
            options.pop("dest")
            parser.add_argument(f.name, metavar=meta["positional"], type=kind, help=meta.get("help"))
            continue
        name = "--" + (meta.get("flag") or f.name.replace("_", "-"))
        if kind is bool:
            parser.add_argument(name, action="store_true", **options)
            continue
        if meta.get("flag") and not meta.get("choices"):
            options["metavar"] = meta["flag"].upper().replace("-", "_")  # as if declared as --flag
        if meta.get("required"):
            options["required"] = True
        else:
            options["default"] = f.default
        parser.add_argument(name, type=kind, **options)


def from_namespace(spec: type, namespace: argparse.Namespace) -> Any:
    return spec(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(spec)})


def runner(spec: type, main: Callable[..., Any]) -> Callable[[argparse.Namespace], int]:
    """The `func` argparse calls: build the spec from the namespace, call main with its fields."""
    def run(namespace: argparse.Namespace) -> int:
        values = from_namespace(spec, namespace)
        result = main(**{f.name: getattr(values, f.name) for f in dataclasses.fields(spec)})
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    return run
