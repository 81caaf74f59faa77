"""`forge plan`: a recipe's targets, what-ifs on top of a recipe, or an ad-hoc model config, planned
with the checks `forge validate` runs (pipeline/planning/); with --dvc, plan.yaml and dvc.yaml's
generated tail instead (pipeline/planning/dvc_plan.py).

What it prints is one typed object per planned target (`TargetPlanView`, pipeline/planning/plan_view.py),
turned into JSON by one function and into a table by another, for recipe targets, what-ifs and ad-hoc
plans alike: a field added to `TargetPlanView` (and one line in `plan_json` / `plan_rows`) appears in
every form. A plan that does not fit prints its memory rows and what would fit, never throughput. Calibration placement
is its own answer beside the serving plan: a node that cannot hold the BF16 model is shown, with its
fix, and never stops the serving plan (`forge validate` and the calibrate stage still refuse it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.cliargs import add_verb, arg, run_with
from pipeline.core.errors import RecipeError, raise_all
from pipeline.core.formats import FORMATS, KV_CACHE_NAMES, canonical_kv_dtype
from pipeline.core.gpus import DEFAULT_CATALOG, GpuSpec, load_catalog
from pipeline.core.yamlio import read_json
from pipeline.measure.probe import probe_ceilings
from pipeline.planning.dvc_plan import (
    DVC_FILE,
    FRONTIER_REPORT_STAGE,
    PLAN_FILE,
    REPORT_STAGE,
    build_plan,
    generated_files,
    repro_changes,
)
from pipeline.planning.plan_view import TargetPlanView, plan_json, render_plan_table
from pipeline.planning.targets import TargetSpec, plan_spec, target_spec
from pipeline.planning.validate import Definitions, fit_problem, spec_problems, validate_recipe, would_fit
from pipeline.recipe.loading import Recipe, load_recipe
from pipeline.recipe.schema import TARGET_DEFAULTS
from pipeline.sizing.memory import ServingShape
from pipeline.sizing.placement import (
    SUPPORTED_MODEL_TYPES,
    Node,
    placement_answer,
    plan_calibration,
    plan_recipe_calibration,
    recipe_node,
)

PLAN_EXAMPLES = """examples:
  forge plan recipes/llama-3-3-70b-instruct/fp8.yaml                 # every target of the recipe
  forge plan recipes/llama-3-3-70b-instruct/fp8.yaml --gpu b200 --format nvfp4 --tp 2   # a what-if on top
  forge plan --model-config recipes/llama-3-3-70b-instruct/config.json --format nvfp4 --gpu b200 --json
  forge plan recipes/gpt-oss-120b/fp8.yaml --gpu h200 --tp 4 --ep 4 --attention-dp on   # an MoE split
  forge plan --dvc                                  # regenerate plan.yaml (+ dvc.yaml artifacts)
  forge plan --dvc --all --model llama-3-1-8b-instruct   # one Hub model on a GPU node
  dvc repro publish@smollm2-135m-instruct-fp8-h200  # then run one target and what it needs
"""

# Flags that change what is planned; on a recipe they are what-ifs on top of its targets.
WHAT_IF_FLAGS = {"gpu": "--gpu", "format": "--format", "tp": "--tp", "ep": "--ep", "attention_dp": "--attention-dp",
                 "kv_dtype": "--kv-dtype",
                 "input_len": "--input-len", "output_len": "--output-len", "seq_len": "--seq-len",
                 "concurrency": "--concurrency", "price": "--price"}


# ---------------------------------------------------------------------------- CLI


@dataclass(frozen=True, kw_only=True)
class PlanArgs:
    """`forge plan`'s arguments, declared once (pipeline/core/cliargs.py)."""

    recipe: str | None = arg(positional="recipe", nargs="?", help="a recipe file (plan each of its targets)")
    model_config: str | None = arg(metavar="CONFIG_JSON", help="HF config.json for an ad-hoc plan (with --format and --gpu)")
    format: str | None = arg(choices=tuple(FORMATS), help="weight format (pipeline/core/formats.py)")
    gpu: str | None = arg(metavar="GPU", help="GPU key from the catalog (forge formats lists them)")
    tp: int | None = arg(choices=(1, 2, 4, 8), help=f"tensor-parallel GPUs (default {TARGET_DEFAULTS.tp})")
    ep: int | None = arg(choices=(1, 2, 4, 8), help="MoE: split the experts this many ways over the TP GPUs (default 1)")
    attention_dp: str | None = arg(choices=("on", "off"),
                                   help="MoE: attention data parallelism, each GPU serving its own requests (default off)")
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
    catalog: Path = arg(DEFAULT_CATALOG, help="GPU catalog (default: %(default)s)")


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "plan", run_with(PlanArgs, cmd_plan),
             help="memory plan, roofline ceilings and the predicted run (or --dvc: regenerate plan.yaml)",
             description=textwrap.fill(
                 "Plan a recipe's targets, what-ifs on top of a recipe (any of --gpu/--format/--tp/"
                 "--kv-dtype/--input-len/--output-len/--seq-len/--concurrency/--price), or an ad-hoc "
                 "model config. Every form runs the checks `forge validate` runs; a plan that does not "
                 "fit prints what would and exits 2. Defaults (recipes and ad-hoc alike): "
                 f"{TARGET_DEFAULTS.describe()}.", 100),
             epilog=PLAN_EXAMPLES)


# ---------------------------------------------------------------------------- the verb


def cmd_plan(args: PlanArgs) -> int:
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


@dataclass(frozen=True)
class PlanRequest:
    """What to plan and how it was asked for: a recipe target, a what-if on one, or ad-hoc flags."""

    title: str  # the artifact name, "<name> (what-if)", or "ad-hoc"
    spec: TargetSpec
    what_ifs: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    calibration: Callable[[dict[str, GpuSpec]], dict[str, Any]] | None = None  # catalog -> calibration plan JSON


def _plan_one(request: PlanRequest, catalog: dict[str, GpuSpec]) -> tuple[TargetPlanView, RecipeError | None]:
    """The checks `forge validate` runs (validate.spec_problems raise before planning); a plan
    that does not fit comes back with what would, and its problem. `forge probe` rates, where
    measured for the GPU, replace datasheet rates in the prediction."""
    spec = request.spec
    raise_all(spec_problems(spec, catalog))
    plan = plan_spec(spec, catalog, probe_ceilings(spec.gpu, spec.format))
    problem = fit_problem(spec, plan, catalog)
    alternatives = tuple(would_fit(spec, catalog)) if problem else ()
    calibration = request.calibration(catalog) if request.calibration else None
    return TargetPlanView(request.title, plan, request.what_ifs, request.defaults, alternatives, calibration), problem


def _given(args: PlanArgs) -> dict[str, Any]:
    return {name: getattr(args, name) for name in WHAT_IF_FLAGS if getattr(args, name) is not None}


def _serving(base: ServingShape, given: dict[str, Any]) -> ServingShape:
    """A ServingShape with the given flags applied on top of `base` (a recipe target's or the defaults')."""
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


def _recipe_requests(args: PlanArgs) -> list[PlanRequest]:
    """Each target of the recipe, or, with flags, what-ifs on top of it: `--gpu` picks (or adds)
    one target, the other flags replace that target's settings. Nothing given is dropped."""
    recipe = load_recipe(Path(args.recipe))
    given = _given(args)

    planned: dict[str, Any] = {}

    def calibration(catalog):  # calibration runs on the recipe's node, whatever the what-ifs: planned once
        if not planned:
            planned.update(placement_answer(lambda: recipe_node(recipe, catalog),
                                            lambda node: plan_recipe_calibration(recipe, catalog, node)))
        return planned

    if not given:
        validate_recipe(recipe, load_catalog(args.catalog), Definitions.of_checkout(Path(".")), placement=False)
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
            tp=given.get("tp", base.tp), ep=given.get("ep", base.ep),
            attention_dp=given["attention_dp"] == "on" if "attention_dp" in given else base.attention_dp,
            serving=serving, where=f"{recipe.path} (what-if {flags})", flags=True,
            fields={"kv": "--kv-dtype", "tp": "--tp", "ep": "--ep", "attention_dp": "--attention-dp", "seq": "--seq-len"},
        )
        specs.append(PlanRequest(f"{recipe.artifact_prefix}-{gpu} (what-if)", spec, what_ifs=given,
                                 calibration=calibration))
    return specs


def _defaulted(recipe: Recipe, gpu: str) -> dict[str, Any]:
    """The target settings this recipe leaves to TARGET_DEFAULTS, so `forge plan` can print them."""
    target, quant = recipe.spec.targets[gpu], recipe.spec.quant
    names = ("max_input_len", "max_output_len", "max_seq_len", "tp", "max_num_tokens", "kv_cache_free_gpu_memory_fraction")
    out = {name: getattr(target, name) for name in names if name not in target.model_fields_set}
    if "max_seq_len" in out:
        out["max_seq_len"] = "max_input_len + max_output_len"
    if "kv_cache_dtype" not in quant.model_fields_set:
        out["kv_cache_dtype"] = quant.kv_cache_dtype
    return out


def _adhoc_request(args: PlanArgs) -> PlanRequest:
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
        tp=args.tp or d.tp, ep=args.ep or 1, attention_dp=args.attention_dp == "on", serving=_serving(base, given),
        where=f"forge plan --gpu {args.gpu}",
        fields={"kv": "--kv-dtype", "tp": "--tp", "ep": "--ep", "attention_dp": "--attention-dp", "seq": "--seq-len"},
        flags=True,
    )

    def calibration(catalog):
        if config.get("model_type") not in SUPPORTED_MODEL_TYPES:  # exploring a model forge cannot place yet
            return {"skipped": f"model_type {config.get('model_type')!r} has no module layout in pipeline/sizing/placement.py "
                               f"(known: {', '.join(SUPPORTED_MODEL_TYPES)})"}
        return placement_answer(lambda: Node(args.gpu, args.calibration_gpus, int(args.cpu_offload_gb * 1e9)),
                                lambda node: plan_calibration(config, args.format, catalog[args.gpu], node,
                                                              args.calibration_batch, args.calibration_seq_len,
                                                              catalog, where="--calibration-gpus", flags=True))

    return PlanRequest("ad-hoc", spec, defaults=defaults, calibration=calibration)


def _write_dvc_plan(args: PlanArgs, catalog: dict[str, GpuSpec]) -> int:
    plan = build_plan(catalog, include_all=args.all, models_wanted=list(args.model) if args.model else None)
    wanted, changes = generated_files(plan), repro_changes(plan)
    if args.check:
        stale = [str(path) for path, text in wanted.items() if not path.exists() or path.read_text() != text]
        if stale:
            raise RecipeError(", ".join(stale), f"stale: recipes/ changed since it was generated ({'; '.join(changes)}).",
                              "run `make plan` and commit plan.yaml and dvc.yaml.")
        print(f"{PLAN_FILE} and the generated tail of {DVC_FILE} (gpu-compare, report stages, artifacts) are fresh.")
        return 0
    for path, text in wanted.items():
        path.write_text(text)
        print(f"wrote {path}")
    print("\n".join(changes))
    print(f"the embedded default: dvc repro {REPORT_STAGE} (make repro); every variant: dvc repro "
          f"{FRONTIER_REPORT_STAGE} (make frontier); one target (and what it needs): " + (
              "; ".join(f"dvc repro publish@{t}" for t in sorted(plan["targets"])) or "none planned"))
    return 0
