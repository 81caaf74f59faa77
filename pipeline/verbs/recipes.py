"""The recipe verbs: `forge validate` (every check, recipe by recipe), `forge show` (a resolved
recipe) and `forge formats` (what a recipe may name: the format registry, KV-cache dtypes and the
GPU catalog, printed from their one source)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.cliargs import add_verb, arg, included, run_with
from pipeline.core.errors import ForgeError, RecipeError, raise_all
from pipeline.core.formats import FORMATS, KV_CACHE_ALIASES, KV_CACHE_DTYPES
from pipeline.core.gpus import DEFAULT_CATALOG, GpuSpec, load_catalog
from pipeline.core.tables import print_table
from pipeline.planning.validate import Definitions, validate_recipe
from pipeline.recipe.loading import RECIPES_DIR, load_recipe, walk_recipes
from pipeline.sizing.plan import Plan


@dataclass(frozen=True)
class CatalogArgs:
    """The catalog option the recipe verbs share."""

    catalog: Path = arg(DEFAULT_CATALOG, help="GPU catalog (default: %(default)s)")


@dataclass(frozen=True, kw_only=True)
class ValidateArgs:
    paths: tuple[str, ...] = arg((), positional="paths", nargs="*",
                                 help="recipe files or directories (default: all under recipes/)")
    common: CatalogArgs = included(CatalogArgs)


@dataclass(frozen=True, kw_only=True)
class ShowArgs:
    recipe: str = arg(positional="recipe")
    json: bool = arg(False)
    common: CatalogArgs = included(CatalogArgs)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "validate", run_with(ValidateArgs, cmd_validate),
             help="check recipes (schema, GPUs, format x compute capability, fit)",
             epilog="example: forge validate recipes/llama-3-3-70b-instruct")

    add_verb(sub, "formats", run_with(CatalogArgs, cmd_formats),
             help="print the format registry, KV-cache dtypes and GPU catalog")

    add_verb(sub, "show", run_with(ShowArgs, cmd_show),
             help="print a resolved recipe",
             epilog="example: forge show recipes/smollm2-135m-instruct/fp8.yaml")


def cmd_validate(args: ValidateArgs) -> int:
    catalog = load_catalog(args.common.catalog)
    paths = [Path(p) for p in args.paths] or [RECIPES_DIR]
    expanded: list[Path] = []
    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise RecipeError(str(path), "no such file or directory.", "pass a recipe file or a directory of recipes.")
        expanded.extend(walk_recipes(path))
    if not expanded:
        raise RecipeError(", ".join(map(str, paths)), "no recipes found (model.yaml and gpus.yaml are not recipes).",
                          "pass recipes/<model>/<variant>.yaml files or the directories that hold them.")
    problems = []
    for path in expanded:
        try:
            plans = validate_one(path, catalog)
        except ForgeError as exc:
            problems.append(exc)
            continue
        summary = ", ".join(f"{gpu} tp{p.inputs['tp']} batch<={p.max_batch_at_seq_len}" for gpu, p in plans.items())
        print(f"ok  {path}  ({summary})")
    print(f"{len(expanded) - len(problems)} of {len(expanded)} recipe(s) valid; GPU catalog {args.common.catalog} has {len(catalog)} GPUs.")
    raise_all(problems)
    return 0


def validate_one(path: Path, catalog: dict[str, GpuSpec]) -> dict[str, Plan]:
    return validate_recipe(load_recipe(path), catalog, Definitions.of_checkout(Path(".")))


def cmd_show(args: ShowArgs) -> int:
    recipe = load_recipe(Path(args.recipe))
    validate_recipe(recipe, load_catalog(args.common.catalog), Definitions.of_checkout(Path(".")))
    resolved = recipe.resolved()
    print(json.dumps(resolved, indent=2) if args.json else yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def cmd_formats(args: CatalogArgs) -> int:
    """The format registry, KV-cache dtypes and GPU catalog, printed from their one source."""
    from rich.table import Table

    catalog = load_catalog(args.catalog)
    formats = Table(title="formats (pipeline/core/formats.py)")
    for column in ("name", "elements", "block", "scale", "bits/weight", "min CC", "ModelOpt preset", "runs on"):
        formats.add_column(column)
    for f in FORMATS.values():
        gpus = ", ".join(k for k, g in catalog.items() if f.min_compute_capability <= g.cc)
        formats.add_row(f.name, f.element_type, str(f.block_size or "-"), f.scale_type or "-", f"{f.bits_per_weight:g}",
                        str(f.min_compute_capability), f.modelopt_config or "-", gpus)
    kv = Table(title="KV-cache dtypes")
    for column in ("name", "also accepted as", "bytes/element", "min CC", "ModelOpt preset"):
        kv.add_column(column)
    for k in KV_CACHE_DTYPES.values():
        aliases = ", ".join(a for a, name in KV_CACHE_ALIASES.items() if name == k.name) or "-"
        kv.add_row(k.name, aliases, f"{k.bytes_per_element:g}", str(k.min_compute_capability), k.modelopt_config or "-")
    gpus = Table(title=f"GPUs ({args.catalog})")
    for column in ("key", "name", "CC", "memory", "bandwidth", "dense TFLOP/s", "TDP"):
        gpus.add_column(column)
    for key, g in catalog.items():
        gpus.add_row(key, g.name, g.compute_capability, f"{g.memory_bytes / 1e9:.0f} GB",
                     f"{g.memory_bandwidth_bytes_per_s / 1e12:.2f} TB/s",
                     " / ".join(f"{d} {v:g}" for d, v in g.tflops.items()), f"{g.tdp_watts:g} W")
    for table in (formats, kv, gpus):
        print_table(table)
    return 0
