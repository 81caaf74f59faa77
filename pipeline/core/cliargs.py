"""A verb's command-line arguments, declared once: a dataclass whose fields are the arguments.

    @dataclass(frozen=True)
    class BuildArgs:
        recipe_path: Path = arg(positional="recipe", help="recipes/<model>/<variant>.yaml")
        gpu: str = arg(required=True, help="a target key of the recipe")
        load_test: str = arg("auto", choices=LOAD_TEST_MODES, help="...")

    def register(sub):
        add_verb(sub, "build", runner(BuildArgs, main), ...)

A field is `--<name with dashes>` unless `positional=` names it; its type is the field's annotation:
Path, str, int, float; bool -> store_true; `X | None` -> optional X; `tuple[X, ...]` -> a repeatable
option (`action="append"`), or with `positional=` and `nargs="*"` several values. `flag=` renames
the option (`--quantized` for `quantized_dir`); `metavar=`, `nargs=` ("?" or "*", positionals) and
`group=` (a mutually exclusive group, by name) pass through to argparse. A field whose annotation is
itself such a dataclass (`registry: RegistryArgs = included(RegistryArgs)`) adds that dataclass's
arguments: options several verbs share are declared once and arrive as one value.

`runner(spec, main)` calls `main(**fields)`, so a field's name is the name of main's parameter: main
keeps an explicit, typed signature for tests and library callers, and argv never reaches it.
`run_with(spec, command)` calls `command(values)` with the spec instance, for a verb whose CLI does
more than call one main (exit codes, options that combine). Either way the namespace is checked
against the annotations (a wrong type is a TypeError, not a silent value). Adding a flag is one
field (and main's parameter of the same name).
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
        positional: str | None = None, flag: str | None = None, choices: tuple[Any, ...] | None = None,
        metavar: str | None = None, nargs: str | None = None, group: str | None = None) -> Any:
    """One argument: a dataclass field carrying its argparse settings."""
    meta = {"help": help, "required": required, "positional": positional, "flag": flag, "choices": choices,
            "metavar": metavar, "nargs": nargs, "group": group}
    if default is dataclasses.MISSING:
        needs_value = required or (positional and nargs is None)
        return dataclasses.field(metadata=meta) if needs_value else dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def included(spec: type) -> Any:
    """A field that adds `spec`'s arguments (options shared by several verbs, declared once)."""
    return dataclasses.field(default_factory=spec)


@dataclasses.dataclass(frozen=True)
class _Kind:
    scalar: type
    repeated: bool  # tuple[X, ...]
    optional: bool  # X | None


def _kind(annotation: Any) -> _Kind:
    """Path | None -> Path, optional; tuple[str, ...] -> str, repeated; bool -> bool."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(kinds) < len(typing.get_args(annotation))
        if len(kinds) != 1:
            raise TypeError(f"cliargs: unsupported argument type {annotation!r} (one type, or one type | None)")
        annotation = kinds[0]
    if typing.get_origin(annotation) is tuple:
        items = typing.get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis and items[0] in _SCALARS:
            return _Kind(items[0], True, optional)
        raise TypeError(f"cliargs: unsupported argument type {annotation!r} (repeated arguments are tuple[X, ...])")
    if annotation is bool or annotation in _SCALARS:
        return _Kind(annotation, False, optional)
    raise TypeError(f"cliargs: unsupported argument type {annotation!r}")


def _nested(hints: dict[str, Any], f: dataclasses.Field) -> type | None:
    hint = hints[f.name]
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def add_arguments(parser: argparse.ArgumentParser, spec: type) -> None:
    hints = typing.get_type_hints(spec)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if (inner := _nested(hints, f)) is not None:
            add_arguments(parser, inner)
            continue
        meta, kind = f.metadata, _kind(hints[f.name])
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        options: dict[str, Any] = {"help": meta.get("help")}
        for key in ("choices", "metavar", "nargs"):
            if meta.get(key) is not None:
                options[key] = meta[key]
        if meta.get("positional"):
            options.setdefault("metavar", meta["positional"])
            if meta.get("nargs"):
                options["default"] = None if f.default is dataclasses.MISSING else f.default
            target.add_argument(f.name, type=kind.scalar, **options)
            continue
        name = "--" + (meta.get("flag") or f.name.replace("_", "-"))
        options["dest"] = f.name
        if kind.scalar is bool:
            target.add_argument(name, action="store_true", **options)
            continue
        if meta.get("flag") and not meta.get("choices"):
            options.setdefault("metavar", meta["flag"].upper().replace("-", "_"))  # as if declared as --flag
        if kind.repeated:
            options["action"] = "append"
        if meta.get("required"):
            options["required"] = True
        else:  # a repeated option appends to None, never to the field's (shared) default
            options["default"] = None if kind.repeated else f.default
        target.add_argument(name, type=kind.scalar, **options)


def from_namespace(spec: type, namespace: argparse.Namespace) -> Any:
    """The spec's instance, its values checked against the annotations."""
    hints = typing.get_type_hints(spec)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if (inner := _nested(hints, f)) is not None:
            values[f.name] = from_namespace(inner, namespace)
            continue
        kind, value = _kind(hints[f.name]), getattr(namespace, f.name)
        if kind.repeated:
            value = f.default if value is None and f.default is not dataclasses.MISSING else value
            value = tuple(value) if isinstance(value, list) else value
        _check(spec, f.name, kind, value)
        values[f.name] = value
    return spec(**values)


def _check(spec: type, name: str, kind: _Kind, value: Any) -> None:
    if value is None and kind.optional:
        return
    items = value if kind.repeated and isinstance(value, tuple) else (value,) if not kind.repeated else None
    wanted = (int, float) if kind.scalar is float else kind.scalar  # argparse's own defaults may be ints
    if items is None or not all(isinstance(v, wanted) and not (kind.scalar is int and isinstance(v, bool))
                                for v in items):
        raise TypeError(f"{spec.__name__}.{name}: expected {kind.scalar.__name__}"
                        f"{' values' if kind.repeated else ''}, got {value!r}")


def runner(spec: type, main: Callable[..., Any]) -> Callable[[argparse.Namespace], int]:
    """The `func` argparse calls: build the spec from the namespace, call main with its fields."""
    def run(namespace: argparse.Namespace) -> int:
        values = from_namespace(spec, namespace)
        return _exit_code(main(**{f.name: getattr(values, f.name) for f in dataclasses.fields(spec)}))

    return _marked(run, spec, main)


def run_with(spec: type, command: Callable[[Any], Any]) -> Callable[[argparse.Namespace], int]:
    """The `func` argparse calls: build the spec from the namespace, call command with it."""
    def run(namespace: argparse.Namespace) -> int:
        return _exit_code(command(from_namespace(spec, namespace)))

    return _marked(run, spec, command)


def add_verb(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], *,
             help: str, epilog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """One verb: its parser, with the arguments of the spec `func` was built from (runner / run_with),
    run by `func`. Epilogs are examples and descriptions are pre-wrapped, so both print as written."""
    parser = sub.add_parser(name, help=help, description=description, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, func.spec)  # type: ignore[attr-defined]
    parser.set_defaults(func=func)
    return parser


def _marked(run: Callable[[argparse.Namespace], int], spec: type, target: Callable[..., Any]):
    """What the `func` was built from: `spec` (its arguments) and `__wrapped__` (what it calls)."""
    run.spec, run.__wrapped__ = spec, target  # type: ignore[attr-defined]
    return run


def _exit_code(result: Any) -> int:
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
