"""`forge`: one CLI whose verbs are the pipeline's stages. dvc.yaml calls these same commands.

Only this module touches argv, the environment and the process exit code. A ForgeError becomes
one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ForgeError, RecipeError
from pipeline.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.gpus import DEFAULT_CATALOG, load_catalog

log = logging.getLogger("forge")

EXAMPLES = """examples:
  forge validate                                   # every recipe under recipes/
  forge show recipes/smollm2-135m-instruct/fp8.yaml
  forge plan recipes/llama-3-3-70b-instruct/fp8.yaml
  forge plan --model-config recipes/llama-3-3-70b-instruct/config.json --format nvfp4 --gpu b200
  forge plan --dvc                                 # regenerate plan.yaml (+ dvc.yaml artifacts)
  forge list --gpu h200                            # published artifacts for one GPU
  forge pull smollm2-135m-instruct --gpu auto --dest ./model   # best artifact for this machine's GPU
  forge probe                                      # measure this GPU's bandwidth and GEMM rates
stage verbs (download, calibration-set, calibrate, baseline, evaluate, build, throughput, report,
publish) are what dvc.yaml runs; `forge VERB --help` shows each one's arguments and an example.
"""


def configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:  # plain lines under DVC and CI, no progress bars (tqdm >= 4.66 reads TQDM_DISABLE)
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # Libraries' deprecation notices (torch, transformers, ModelOpt, lm-eval) speak to their
        # callers' authors, not to someone running a stage; `forge -v` shows them.
        import warnings

        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


# ---------------------------------------------------------------------------- validate / show / plan


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.recipe import discover_recipes, load_recipe
    from pipeline.validate import validate_recipe

    catalog = load_catalog(args.catalog)
    paths = [Path(p) for p in args.paths] or discover_recipes()
    if not paths:
        raise RecipeError("recipes/", "no recipes found.", "add recipes/<model>/<variant>.yaml.")
    expanded: list[Path] = []
    for path in paths:
        expanded.extend(discover_recipes(path) if path.is_dir() else [path])
    for path in expanded:
        recipe = load_recipe(path)
        plans = validate_recipe(recipe, catalog)
        summary = ", ".join(
            f"{gpu} tp{p.inputs['tp']} batch<={p.max_batch_at_seq_len}" for gpu, p in plans.items()
        )
        print(f"ok  {path}  ({summary})")
    print(f"{len(expanded)} recipe(s) valid; GPU catalog {args.catalog} has {len(catalog)} GPUs.")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.recipe import load_recipe
    from pipeline.validate import validate_recipe

    recipe = load_recipe(Path(args.recipe))
    validate_recipe(recipe, load_catalog(args.catalog))
    resolved = recipe.resolved()
    print(json.dumps(resolved, indent=2) if args.json else yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:,.2f} GB"


def _num(n: float | None, unit: str = "") -> str:
    return "-" if n is None else f"{n:,.1f}{unit}"


def render_plan_table(title: str, plan_json: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    inputs = plan_json["inputs"]
    rows = [
        ("format / KV cache", f"{inputs['format']} / {inputs['kv_cache_dtype']}"),
        ("GPU (compute capability) x TP", f"{inputs['gpu']} ({inputs['compute_capability']}) x {inputs['tp']}"),
        ("params", f"{plan_json['params'] / 1e9:,.3f} B"),
        ("weights (all GPUs)", _gb(plan_json["weights_bytes"])),
        ("weights per GPU", _gb(plan_json["weights_bytes_per_gpu"])),
        ("KV per token (per GPU)", f"{plan_json['kv_bytes_per_token'] / 1024:,.1f} KiB ({plan_json['kv_bytes_per_token_per_gpu'] / 1024:,.1f} KiB)"),
        ("GPU memory", _gb(plan_json["memory_bytes"])),
        ("runtime reserve (estimate)", _gb(plan_json["reserve_bytes"])),
        ("memory left for KV", _gb(plan_json["memory_left_for_kv_bytes"])),
        (f"KV pool ({inputs['kv_cache_free_gpu_memory_fraction']:.0%} of that)", _gb(plan_json["kv_pool_bytes"])),
        ("KV capacity", f"{plan_json['kv_capacity_tokens']:,} tokens"),
        (f"max batch at seq len {inputs['seq_len']:,}", f"{plan_json['max_batch_at_seq_len']:,}"),
        ("fits", "yes" if plan_json["fits"] else f"NO: {plan_json['why_not']}"),
        ("smallest TP that fits", str(plan_json["min_tp"]) if plan_json["min_tp"] else "none up to 8"),
        ("decode tok/s, batch 1 (predicted)", _num(plan_json["decode_tok_s_batch1"])),
        (f"decode tok/s, batch {plan_json['decode_batch']} (predicted)", _num(plan_json["decode_tok_s_max_batch"])),
        ("  bound by", str(plan_json["decode_bound_max_batch"])),
        ("prefill tok/s (predicted)", _num(plan_json["prefill_tok_s"])),
        ("J/token at TDP (predicted)", _num(plan_json["joules_per_token"], " J")),
        ("$ per M output tokens (predicted)", _num(plan_json["usd_per_mtok"])),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    print(f"predicted = roofline ceiling from {plan_json['ceilings_source']} rates; TensorRT-LLM reaches ~30-40% of it.")


def cmd_plan(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    if args.dvc:
        return _write_dvc_plan(args, catalog)
    plans: dict[str, dict[str, Any]] = {}
    if args.recipe:
        if args.model_config:
            raise RecipeError("forge plan", "give a RECIPE or --model-config, not both.", "drop one.")
        from pipeline.recipe import load_recipe
        from pipeline.validate import plan_target, validate_recipe

        recipe = load_recipe(Path(args.recipe))
        validate_recipe(recipe, catalog)
        for gpu in recipe.spec.targets:
            plans[recipe.artifact_name(gpu)] = plan_target(recipe, gpu, catalog).to_json()
    else:
        plans["ad-hoc"] = _adhoc_plan(args, catalog).to_json()
    if args.json:
        print(json.dumps(plans if len(plans) > 1 else next(iter(plans.values())), indent=2))
    else:
        for title, plan_json in plans.items():
            render_plan_table(title, plan_json)
    return 0


def _adhoc_plan(args: argparse.Namespace, catalog):
    from pipeline.sizing import ServingShape, plan

    missing = [flag for flag, value in (("--model-config", args.model_config), ("--format", args.format), ("--gpu", args.gpu)) if not value]
    if missing:
        raise RecipeError("forge plan", f"missing {', '.join(missing)}.", "pass a RECIPE, or --model-config, --format and --gpu.")
    if args.gpu not in catalog:
        raise RecipeError("--gpu", f"unknown GPU '{args.gpu}'.", f"use one of {', '.join(catalog)}.")
    path = Path(args.model_config)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecipeError(str(path), f"cannot read a JSON model config ({exc}).", "pass a HF config.json.") from None
    serving = ServingShape(max_input_len=args.input_len, max_output_len=args.output_len,
                           seq_len=args.seq_len or args.input_len + args.output_len,
                           concurrency=args.concurrency, price_per_gpu_hour_usd=args.price)
    return plan(config, FORMATS[args.format], KV_CACHE_DTYPES[args.kv_dtype], catalog[args.gpu], args.gpu, serving, tp=args.tp)


def _write_dvc_plan(args: argparse.Namespace, catalog) -> int:
    from pipeline.planfile import DVC_FILE, PLAN_FILE, build_plan, render_plan, with_artifacts

    plan = build_plan(catalog, include_all=args.all)
    wanted = {PLAN_FILE: render_plan(plan), DVC_FILE: with_artifacts(DVC_FILE.read_text(), plan)}
    if args.check:
        stale = [str(path) for path, text in wanted.items() if not path.exists() or path.read_text() != text]
        if stale:
            raise RecipeError(", ".join(stale), "stale: recipes/ changed since it was generated.",
                              "run `make plan` and commit plan.yaml and dvc.yaml.")
        print(f"{PLAN_FILE} and the artifacts of {DVC_FILE} are fresh.")
        return 0
    for path, text in wanted.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def cmd_formats(args: argparse.Namespace) -> int:
    """The format registry, KV-cache dtypes and GPU catalog, printed from their one source."""
    from rich.console import Console
    from rich.table import Table

    catalog = load_catalog(args.catalog)
    formats = Table(title="formats (pipeline/formats.py)")
    for column in ("name", "elements", "block", "scale", "bits/weight", "min CC", "ModelOpt preset", "runs on"):
        formats.add_column(column)
    for f in FORMATS.values():
        gpus = ", ".join(k for k, g in catalog.items() if f.min_compute_capability <= g.cc)
        formats.add_row(f.name, f.element_type, str(f.block_size or "-"), f.scale_type or "-", f"{f.bits_per_weight:g}",
                        str(f.min_compute_capability), f.modelopt_config or "-", gpus)
    kv = Table(title="KV-cache dtypes")
    for column in ("name", "bytes/element", "min CC", "ModelOpt preset"):
        kv.add_column(column)
    for k in KV_CACHE_DTYPES.values():
        kv.add_row(k.name, f"{k.bytes_per_element:g}", str(k.min_compute_capability), k.modelopt_config or "-")
    gpus = Table(title=f"GPUs ({args.catalog})")
    for column in ("key", "name", "CC", "memory", "bandwidth", "dense TFLOP/s", "TDP"):
        gpus.add_column(column)
    for key, g in catalog.items():
        gpus.add_row(key, g.name, g.compute_capability, f"{g.memory_bytes / 1e9:.0f} GB",
                     f"{g.memory_bandwidth_bytes_per_s / 1e12:.2f} TB/s",
                     " / ".join(f"{d} {v:g}" for d, v in g.tflops.items()), f"{g.tdp_watts:g} W")
    console = Console()
    for table in (formats, kv, gpus):
        console.print(table)
    return 0


# ---------------------------------------------------------------------------- parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG, help="GPU catalog (default: %(default)s)")


def build_parser(stage_verbs: dict[str, Callable[[argparse._SubParsersAction], None]] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forge", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("validate", help="check recipes (schema, GPUs, format x compute capability, fit)",
                       epilog="example: forge validate recipes/llama-3-3-70b-instruct")
    p.add_argument("paths", nargs="*", help="recipe files or directories (default: all under recipes/)")
    _add_common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("formats", help="print the format registry, KV-cache dtypes and GPU catalog")
    _add_common(p)
    p.set_defaults(func=cmd_formats)

    p = sub.add_parser("show", help="print a resolved recipe", epilog="example: forge show recipes/smollm2-135m-instruct/fp8.yaml")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("plan", help="memory plan and predicted roofline (or --dvc: regenerate plan.yaml)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?")
    p.add_argument("--model-config", help="HF config.json for an ad-hoc plan")
    p.add_argument("--format", choices=list(FORMATS), help="weight format")
    p.add_argument("--gpu", help="GPU key from the catalog")
    p.add_argument("--tp", type=int, default=1, choices=[1, 2, 4, 8])
    p.add_argument("--kv-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--seq-len", type=int, help="max sequence length (default input + output)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--price", type=float, help="USD per GPU-hour, for $/Mtok")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dvc", action="store_true", help="write plan.yaml (the list dvc.yaml iterates over)")
    p.add_argument("--all", action="store_true", help="with --dvc: include models that need a GPU node / the Hub")
    p.add_argument("--check", action="store_true", help="with --dvc: fail if plan.yaml is stale")
    _add_common(p)
    p.set_defaults(func=cmd_plan)

    for register in (stage_verbs or {}).values():
        register(sub)
    return parser


def stage_verbs() -> dict[str, Callable[[argparse._SubParsersAction], None]]:
    """Stage modules register their own sub-commands; imported lazily so `forge validate` stays fast."""
    from pipeline.stages import registry_of_verbs

    return registry_of_verbs()


# Only these verbs may reach the Hugging Face Hub (weights; hub calibration data). Every other
# stage runs offline, so a compute step can never download silently.
ONLINE_VERBS = {"download", "calibration-set"}


def main(argv: list[str] | None = None) -> int:
    import os

    parser = build_parser(stage_verbs())
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if args.verb not in ONLINE_VERBS:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        return int(args.func(args) or 0)
    except ForgeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
