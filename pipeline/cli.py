"""`forge`: one CLI whose verbs are the pipeline's stages. dvc.yaml calls these same commands.

Only this module touches argv, the environment and the process exit code. A ForgeError becomes
one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.cliargs import add_verb, arg, included, run_with
from pipeline.errors import ForgeError, RecipeError
from pipeline.formats import FORMATS, KV_CACHE_ALIASES, KV_CACHE_DTYPES, KV_CACHE_NAMES
from pipeline.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.recipe import TARGET_DEFAULTS

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
  forge new meta-llama/Llama-3.1-8B-Instruct --revision <40-hex commit> --config config.json --gpu h200 --gpu b200
stage verbs (download, calibration-set, calibrate, baseline, evaluate, build, throughput, report,
publish) are what dvc.yaml runs; `forge VERB --help` shows each one's arguments and an example.
"""


PLAN_EXAMPLES = """examples:
  forge plan recipes/llama-3-3-70b-instruct/fp8.yaml                 # every target of the recipe
  forge plan recipes/llama-3-3-70b-instruct/fp8.yaml --gpu b200 --format nvfp4 --tp 2   # a what-if on top
  forge plan --model-config recipes/llama-3-3-70b-instruct/config.json --format nvfp4 --gpu b200 --json
  forge plan --dvc                                  # regenerate plan.yaml (+ dvc.yaml artifacts)
  forge plan --dvc --all --model llama-3-1-8b-instruct   # one Hub model on a GPU node
  dvc repro publish@smollm2-135m-instruct-fp8-h200  # then run one target and what it needs
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


def cmd_validate(args: ValidateArgs) -> int:
    from pipeline.errors import raise_all
    from pipeline.recipe import RECIPES_DIR, walk_recipes

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


def validate_one(path: Path, catalog):
    from pipeline.recipe import load_recipe
    from pipeline.validate import Definitions, validate_recipe

    return validate_recipe(load_recipe(path), catalog, Definitions.of_checkout(Path(".")))


def cmd_show(args: ShowArgs) -> int:
    import yaml

    from pipeline.recipe import load_recipe
    from pipeline.validate import Definitions, validate_recipe

    recipe = load_recipe(Path(args.recipe))
    validate_recipe(recipe, load_catalog(args.common.catalog), Definitions.of_checkout(Path(".")))
    resolved = recipe.resolved()
    print(json.dumps(resolved, indent=2) if args.json else yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


# Flags that change what is planned; on a recipe they are what-ifs on top of its targets.
WHAT_IF_FLAGS = {"gpu": "--gpu", "format": "--format", "tp": "--tp", "kv_dtype": "--kv-dtype",
                 "input_len": "--input-len", "output_len": "--output-len", "seq_len": "--seq-len",
                 "concurrency": "--concurrency", "price": "--price"}


def cmd_plan(args: PlanArgs) -> int:
    from pipeline.errors import raise_all
    from pipeline.planview import plan_json, render_plan_table

    catalog = load_catalog(args.catalog)
    if args.dvc:
        return _write_dvc_plan(args, catalog)
    if args.model:
        raise RecipeError("forge plan --model", "--model selects a model for --dvc.", "add --dvc (and --all for Hub models).")
    if args.recipe and args.model_config:
        raise RecipeError("forge plan", "give a RECIPE or --model-config, not both.", "drop one.")
    requests = _recipe_requests(args) if args.recipe else [_adhoc_request(args)]
    planned, problems = [], []
    for request in requests:
        target, problem = _plan_one(request, catalog)
        planned.append(target)
        if problem:
            problems.append(problem)
    if args.json:
        out = {t.title: plan_json(t) for t in planned}
        print(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=2))
    else:
        for target in planned:
            render_plan_table(target)
    raise_all(problems)  # a plan that does not fit exits 2, after showing what would
    return 0


def _plan_one(request, catalog):
    """The checks `forge validate` runs (validate.spec_problems raise before planning); a plan
    that does not fit comes back with what would, and its problem. `forge probe` rates, where
    measured for the GPU, replace datasheet rates in the prediction."""
    from pipeline.errors import raise_all
    from pipeline.perf import probe_ceilings
    from pipeline.planview import PlannedTarget
    from pipeline.validate import fit_problem, plan_spec, spec_problems, would_fit

    spec = request.spec
    raise_all(spec_problems(spec, catalog))
    plan = plan_spec(spec, catalog, probe_ceilings(spec.gpu, spec.format))
    problem = fit_problem(spec, plan, catalog)
    alternatives = tuple(would_fit(spec, catalog)) if problem else ()
    calibration = request.calibration(catalog) if request.calibration else None
    return PlannedTarget(request.title, plan, request.what_ifs, request.defaults, alternatives, calibration), problem


def _given(args: PlanArgs) -> dict[str, Any]:
    return {name: getattr(args, name) for name in WHAT_IF_FLAGS if getattr(args, name) is not None}


def _serving(base, given: dict[str, Any]):
    """A ServingShape with the given flags applied on top of `base` (a recipe target's or the defaults')."""
    import dataclasses

    changes = {key: given[flag] for flag, key in (("input_len", "max_input_len"), ("output_len", "max_output_len"),
                                                  ("concurrency", "concurrency"), ("price", "price_per_gpu_hour_usd"))
               if flag in given}
    if "seq_len" in given:
        changes["seq_len"] = given["seq_len"]
    elif {"input_len", "output_len"} & set(given):  # keep max_seq_len >= one request
        total = changes.get("max_input_len", base.max_input_len) + changes.get("max_output_len", base.max_output_len)
        changes["seq_len"] = max(base.seq_len, total)
    shape = dataclasses.replace(base, **changes)
    if shape.seq_len < shape.max_input_len + shape.max_output_len:
        raise RecipeError("--seq-len", f"max_seq_len {shape.seq_len} < max_input_len + max_output_len "
                          f"({shape.max_input_len + shape.max_output_len}).", "raise --seq-len or leave it out.")
    return shape


def _recipe_requests(args: PlanArgs):
    """Each target of the recipe, or, with flags, what-ifs on top of it: `--gpu` picks (or adds)
    one target, the other flags replace that target's settings. Nothing given is dropped."""
    import dataclasses

    from pipeline.formats import canonical_kv_dtype
    from pipeline.placement import plan_recipe_calibration
    from pipeline.planview import PlanRequest
    from pipeline.recipe import load_recipe
    from pipeline.validate import Definitions, target_spec, validate_recipe

    recipe = load_recipe(Path(args.recipe))
    given = _given(args)

    def calibration(catalog):  # calibration runs on the recipe's node, whatever the what-ifs
        return plan_recipe_calibration(recipe, catalog).to_json()

    if not given:
        validate_recipe(recipe, load_catalog(args.catalog), Definitions.of_checkout(Path(".")))
        return [PlanRequest(recipe.artifact_name(gpu), target_spec(recipe, gpu), defaults=_defaulted(recipe, gpu),
                            calibration=calibration)
                for gpu in recipe.spec.targets]
    gpus = [given["gpu"]] if "gpu" in given else list(recipe.spec.targets)
    specs = []
    for gpu in gpus:
        base_gpu = gpu if gpu in recipe.spec.targets else next(iter(recipe.spec.targets))
        base = target_spec(recipe, base_gpu)
        serving = _serving(base.serving, given)
        if gpu != base_gpu and "price" not in given:  # a price is per GPU model: not carried to another
            serving = dataclasses.replace(serving, price_per_gpu_hour_usd=None)
        flags = " ".join(f"{WHAT_IF_FLAGS[k]} {v}" for k, v in given.items())
        spec = dataclasses.replace(
            base, gpu=gpu, format=given.get("format", base.format),
            kv_cache_dtype=canonical_kv_dtype(given.get("kv_dtype", base.kv_cache_dtype)),
            tp=given.get("tp", base.tp), serving=serving,
            where=f"{recipe.path} (what-if {flags})", flags=True,
            fields={"kv": "--kv-dtype", "tp": "--tp", "seq": "--seq-len"},
        )
        specs.append(PlanRequest(f"{recipe.artifact_prefix}-{gpu} (what-if)", spec, what_ifs=given,
                                 calibration=calibration))
    return specs


def _defaulted(recipe, gpu: str) -> dict[str, Any]:
    """The target settings this recipe leaves to TARGET_DEFAULTS, so `forge plan` can print them."""
    target, quant = recipe.spec.targets[gpu], recipe.spec.quant
    names = ("max_input_len", "max_output_len", "max_seq_len", "tp", "max_num_tokens", "kv_cache_free_gpu_memory_fraction")
    out = {name: getattr(target, name) for name in names if name not in target.model_fields_set}
    if "max_seq_len" in out:
        out["max_seq_len"] = "max_input_len + max_output_len"
    if "kv_cache_dtype" not in quant.model_fields_set:
        out["kv_cache_dtype"] = quant.kv_cache_dtype
    return out


def _adhoc_request(args: PlanArgs):
    from pipeline.formats import canonical_kv_dtype
    from pipeline.planview import PlanRequest
    from pipeline.recipe import TARGET_DEFAULTS
    from pipeline.sizing import ServingShape
    from pipeline.validate import TargetSpec
    from pipeline.yamlio import read_json

    missing = [flag for flag, value in (("--model-config", args.model_config), ("--format", args.format),
                                        ("--gpu", args.gpu)) if not value]
    if missing:
        raise RecipeError("forge plan", f"missing {', '.join(missing)}.", "pass a RECIPE, or --model-config, --format and --gpu.")
    d = TARGET_DEFAULTS
    given = _given(args)
    defaults = {WHAT_IF_FLAGS[key]: value for key, value in (
        ("tp", d.tp), ("kv_dtype", d.kv_cache_dtype), ("input_len", d.max_input_len),
        ("output_len", d.max_output_len), ("seq_len", "input + output")) if key not in given}
    base = ServingShape(max_input_len=d.max_input_len, max_output_len=d.max_output_len,
                        seq_len=d.max_input_len + d.max_output_len, max_num_tokens=d.max_num_tokens,
                        kv_cache_free_gpu_memory_fraction=d.kv_cache_free_gpu_memory_fraction)
    config = read_json(Path(args.model_config), "model's config.json")
    spec = TargetSpec(
        model=Path(args.model_config).parent.name or "model", config=config, format=args.format,
        kv_cache_dtype=canonical_kv_dtype(args.kv_dtype or d.kv_cache_dtype), gpu=args.gpu,
        tp=args.tp or d.tp, serving=_serving(base, given), where=f"forge plan --gpu {args.gpu}",
        fields={"kv": "--kv-dtype", "tp": "--tp", "seq": "--seq-len"}, flags=True,
    )

    def calibration(catalog):
        from pipeline.placement import SUPPORTED_MODEL_TYPES, Node, plan_calibration

        if config.get("model_type") not in SUPPORTED_MODEL_TYPES:  # exploring a model forge cannot place yet
            return {"skipped": f"model_type {config.get('model_type')!r} has no module layout in pipeline/placement.py "
                               f"(known: {', '.join(SUPPORTED_MODEL_TYPES)})"}
        node = Node(args.gpu, args.calibration_gpus, int(args.cpu_offload_gb * 1e9))
        return plan_calibration(config, args.format, catalog[args.gpu], node, args.calibration_batch,
                                args.calibration_seq_len, catalog, where="--calibration-gpus").to_json()

    return PlanRequest("ad-hoc", spec, defaults=defaults, calibration=calibration)


def _write_dvc_plan(args: PlanArgs, catalog) -> int:
    from pipeline.planfile import (
        DVC_FILE,
        FRONTIER_REPORT_STAGE,
        PLAN_FILE,
        REPORT_STAGE,
        build_plan,
        render_plan,
        with_generated,
    )

    plan = build_plan(catalog, include_all=args.all, models_wanted=list(args.model) if args.model else None)
    wanted = {PLAN_FILE: render_plan(plan), DVC_FILE: with_generated(DVC_FILE.read_text(), plan)}
    if args.check:
        stale = [str(path) for path, text in wanted.items() if not path.exists() or path.read_text() != text]
        if stale:
            raise RecipeError(", ".join(stale), "stale: recipes/ changed since it was generated.",
                              "run `make plan` and commit plan.yaml and dvc.yaml.")
        print(f"{PLAN_FILE} and the generated tail of {DVC_FILE} (report stages, artifacts) are fresh.")
        return 0
    for path, text in wanted.items():
        path.write_text(text)
        print(f"wrote {path}")
    print(f"the embedded default: dvc repro {REPORT_STAGE} (make repro); every variant: dvc repro "
          f"{FRONTIER_REPORT_STAGE} (make frontier); one target (and what it needs): " + (
              "; ".join(f"dvc repro publish@{t}" for t in sorted(plan["targets"])) or "none planned"))
    return 0


def cmd_formats(args: CatalogArgs) -> int:
    """The format registry, KV-cache dtypes and GPU catalog, printed from their one source."""
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
    from pipeline.tables import print_table

    for table in (formats, kv, gpus):
        print_table(table)
    return 0


# ---------------------------------------------------------------------------- parser


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


@dataclass(frozen=True, kw_only=True)
class PlanArgs:
    """`forge plan`'s arguments, declared once (pipeline/cliargs.py)."""

    recipe: str | None = arg(positional="recipe", nargs="?", help="a recipe file (plan each of its targets)")
    model_config: str | None = arg(metavar="CONFIG_JSON", help="HF config.json for an ad-hoc plan (with --format and --gpu)")
    format: str | None = arg(choices=tuple(FORMATS), help="weight format (pipeline/formats.py)")
    gpu: str | None = arg(metavar="GPU", help="GPU key from the catalog (forge formats lists them)")
    tp: int | None = arg(choices=(1, 2, 4, 8), help=f"tensor-parallel GPUs (default {TARGET_DEFAULTS.tp})")
    kv_dtype: str | None = arg(choices=tuple(KV_CACHE_NAMES),
                               help="KV-cache dtype; bf16/fp16 name the unquantized cache (= auto) "
                                    f"(default {TARGET_DEFAULTS.kv_cache_dtype})")
    input_len: int | None = arg(metavar="N", help=f"max input tokens per request (default {TARGET_DEFAULTS.max_input_len})")
    output_len: int | None = arg(metavar="N", help=f"max output tokens per request (default {TARGET_DEFAULTS.max_output_len})")
    seq_len: int | None = arg(metavar="N", help="max sequence length the KV pool must hold per request (default input + output)")
    concurrency: int | None = arg(metavar="N", help="target concurrent sequences (default: as many as fit)")
    price: float | None = arg(metavar="USD", help="USD per GPU-hour, for $/Mtok (default: not reported)")
    calibration_gpus: int = arg(8, metavar="N", help="ad-hoc: GPUs (of --gpu) in the calibration node (default %(default)s)")
    calibration_batch: int = arg(1, metavar="N", help="ad-hoc: calibration batch size (default %(default)s)")
    calibration_seq_len: int = arg(512, metavar="N",
                                   help="ad-hoc: calibration sample length (default %(default)s, as ModelOpt's hf_ptq.py)")
    cpu_offload_gb: float = arg(0, metavar="GB", help="ad-hoc: host RAM calibration may offload layers to (default %(default)s)")
    json: bool = arg(False, help="machine-readable output")
    dvc: bool = arg(False, help="write plan.yaml and dvc.yaml's artifacts (the list dvc.yaml iterates over)")
    all: bool = arg(False, help="with --dvc: include models that need a GPU node / the Hub")
    model: tuple[str, ...] | None = arg(metavar="NAME", help="with --dvc: only this model (repeatable)")
    check: bool = arg(False, help="with --dvc: fail if plan.yaml is stale")
    common: CatalogArgs = included(CatalogArgs)

    @property
    def catalog(self) -> Path:
        return self.common.catalog


def build_parser(stage_verbs: dict[str, Callable[[argparse._SubParsersAction], None]] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forge", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors (also after the verb)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    add_verb(sub, "validate", run_with(ValidateArgs, cmd_validate),
             help="check recipes (schema, GPUs, format x compute capability, fit)",
             epilog="example: forge validate recipes/llama-3-3-70b-instruct")

    add_verb(sub, "formats", run_with(CatalogArgs, cmd_formats),
             help="print the format registry, KV-cache dtypes and GPU catalog")

    add_verb(sub, "show", run_with(ShowArgs, cmd_show),
             help="print a resolved recipe",
             epilog="example: forge show recipes/smollm2-135m-instruct/fp8.yaml")

    add_verb(sub, "plan", run_with(PlanArgs, cmd_plan),
             help="memory plan and predicted roofline (or --dvc: regenerate plan.yaml)",
             description=textwrap.fill(
                 "Plan a recipe's targets, what-ifs on top of a recipe (any of --gpu/--format/--tp/"
                 "--kv-dtype/--input-len/--output-len/--seq-len/--concurrency/--price), or an ad-hoc "
                 "model config. Every form runs the checks `forge validate` runs; a plan that does not "
                 "fit prints what would and exits 2. Defaults (recipes and ad-hoc alike): "
                 f"{TARGET_DEFAULTS.describe()}.", 100),
             epilog=PLAN_EXAMPLES)

    from pipeline.newmodel import register as register_new

    register_new(sub)

    from pipeline.fleet.cli import register as register_fleet

    register_fleet(sub)

    for register in (stage_verbs or {}).values():
        register(sub)
    _accept_global_flags_after_the_verb(sub)
    return parser


def _accept_global_flags_after_the_verb(sub: argparse._SubParsersAction) -> None:
    """`forge validate --debug` as well as `forge --debug validate`. SUPPRESS keeps a verb's parser
    from resetting what the top-level parser already set (argparse copies sub-parser defaults)."""
    for verb_parser in set(sub.choices.values()):
        for flags, options in ((("--debug",), {"help": "show tracebacks for errors"}),
                               (("-v", "--verbose"), {"help": "debug logging"})):
            try:
                verb_parser.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, **options)
            except argparse.ArgumentError:  # the verb defines this flag itself
                pass


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
    except BrokenPipeError:
        # `forge plan ... | head -1`: the reader left. Point stdout at devnull so the interpreter's
        # final flush does not raise again (Python docs, signal module: "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
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
