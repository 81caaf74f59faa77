"""`forge publish`: ship a gated bundle to the registry (`forge pull` and `forge list`, the way back,
are pipeline/verbs/pull.py and listing.py; all three take pipeline/registry/args.py's registry options).

publish (one DVC stage per model x format x GPU) refuses unless the bundle and its evaluation are
intact and chain back, manifest digest by manifest digest, to this recipe's calibrate output, its
calibration set and the downloaded model. Which verdict gates, and what an inconclusive one does, is
one rule (pipeline/recipe/eval_schema.py GATE_RULE; the receipt's `gated_on` and `gate_rule` state it).
A failed accuracy gate is a recorded result, not a crash:
the receipt in `--out` says why nothing was published, and the exit code is 0 so `dvc repro`
finishes (`--strict`: 1). Out (`--out`): `receipt.json` and `manifest.json`.

The registry is any kind pipeline/registry/backends.py opens (directory, OCI, plain layout, HTTP); every kind
offers the same calls, so nothing here branches on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.accuracy.gate_source import choose_gate_source
from pipeline.accuracy.gates import GateReport
from pipeline.core.cliargs import add_verb, arg, included, run_with
from pipeline.core.errors import RegistryError, StageInputError
from pipeline.core.files import Timer, sha256_file, staged_output, write_json
from pipeline.core.formats import FORMATS
from pipeline.core.gpus import DEFAULT_CATALOG, GpuSpec, load_catalog
from pipeline.core.json_numbers import json_number
from pipeline.core.layout import GATE_REPORT_FILE, RECEIPT_FILE
from pipeline.engines.checkpoint_check import require_loadable
from pipeline.handoff.kpis import TIMINGS_HELP, write_timings
from pipeline.handoff.lineage import RERUN, Link, check_lineage
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.handoff.models import BuildDetails, EvaluateDetails, PublishDetails
from pipeline.handoff.reader import Opened, open_upstream
from pipeline.planning.validate import Definitions, require_target, validate_recipe
from pipeline.recipe.eval_schema import GATE_RULE
from pipeline.recipe.loading import Recipe, load_recipe
from pipeline.registry.args import RegistryArgs
from pipeline.registry.artifacts import PublishResult, validate_name
from pipeline.registry.backends import open_registry
from pipeline.registry.selection import installed_version
from pipeline.registry.tags import has_tag, tag_stage, tag_version
from pipeline.registry.waiting import DEFAULT_TIMEOUT_S
from pipeline.sizing.memory import KV_BLOCK_TOKENS

log = logging.getLogger(__name__)

# Recipe sections a published version depends on. `publish` is left out on purpose: relabelling
# (publish.stage) must not mint a new version of identical files.
METADATA_SECTIONS = ("model", "quant", "calibration", "eval", "build")

PUBLISH_EXAMPLE = """example:
  forge publish recipes/smollm2-135m-instruct/fp8.yaml --gpu h200 \\
      --bundle data/bundles/smollm2-135m-instruct-fp8-h200 --evaluation data/eval/smollm2-135m-instruct-fp8 \\
      --registry registry --out data/published/smollm2-135m-instruct-fp8-h200 [--tag] [--stage prod]
"""


# ---------------------------------------------------------------------------- CLI


@dataclass(frozen=True, kw_only=True)
class PublishArgs:
    """`forge publish`'s arguments, declared once (pipeline/core/cliargs.py)."""

    recipe: Path = arg(positional="recipe", help="recipes/<model>/<variant>.yaml")
    gpu: str = arg(required=True, help="the recipe target (GPU catalog key) the bundle was built for")
    bundle: Path = arg(required=True, help="the build stage's output directory")
    evaluation: Path = arg(required=True, help="the evaluate stage's output directory")
    served_evaluation: Path | None = arg(
        help="the serve-eval stage's output: gate on it where the bundle was served (else on --evaluation)")
    out: Path = arg(required=True, help="where the receipt goes (replaced atomically)")
    stage: str | None = arg(help="stage label to assign, e.g. prod (default: the recipe's publish.stage)")
    tag: bool = arg(False, help="also create GTO git tags name@vX.Y.Z / name#stage#N here")
    strict: bool = arg(False, help="exit 1 when the accuracy gate failed (default: 0)")
    timings: Path | None = arg(help=TIMINGS_HELP)
    where: RegistryArgs = included(RegistryArgs)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "publish", run_with(PublishArgs, run_publish),
             help="publish a gated bundle whose lineage checks out to the artifact registry",
             epilog=PUBLISH_EXAMPLE)


def run_publish(args: PublishArgs) -> int:
    receipt = main(args.recipe, args.gpu, args.bundle, args.evaluation, args.where.url, args.out,
                   stage=args.stage, tag=args.tag, repo_dir=Path.cwd(), catalog_path=args.where.catalog,
                   served_evaluation_dir=args.served_evaluation, timings_path=args.timings,
                   registry_timeout_s=args.where.deadline_s)
    return 1 if args.strict and receipt.gate_failed else 0


# ---------------------------------------------------------------------------- publish


def main(recipe_path: Path, gpu: str, bundle_dir: Path, evaluation_dir: Path, registry: str, out_dir: Path, *,
         stage: str | None = None, tag: bool = False, repo_dir: Path = Path("."),
         catalog_path: Path = DEFAULT_CATALOG, served_evaluation_dir: Path | None = None,
         timings_path: Path | None = None, registry_timeout_s: float = DEFAULT_TIMEOUT_S) -> PublishDetails:
    timer = Timer()
    recipe = load_recipe(Path(recipe_path))
    catalog = load_catalog(Path(catalog_path))
    validate_recipe(recipe, catalog, Definitions())
    require_target(recipe, gpu)
    name = validate_name(recipe.artifact_name(gpu))
    with timer("verify"):
        bundle: Opened[BuildDetails] = open_upstream(Path(bundle_dir), "build")
        source = choose_gate_source(Path(evaluation_dir), served_evaluation_dir, Path(bundle_dir))
        evaluation: Opened[EvaluateDetails] = open_upstream(source.evaluation_dir, "evaluate")
        check_bundle_target(recipe, gpu, bundle)
        # Nothing unloadable is published: the build's engine-contract table must name a loader.
        require_loadable([row.model_dump() for row in bundle.details.compatibility], f"bundle {bundle.path}")
        lineage = check_lineage(recipe, name, bundle, evaluation)
        gate = read_gate(evaluation)
    meta = artifact_metadata(recipe, gpu, catalog[gpu], bundle, evaluation, gate, lineage)
    meta["gate"]["scored_by"] = source.scored_by
    target = open_registry(registry, registry_timeout_s)
    decided = {"gated_on": gated_on(source.scored_by, gate), "gate_rule": GATE_RULE}
    receipt = refuse(PublishCandidate(recipe, gpu, bundle, evaluation, gate, meta), name, registry)
    if receipt is not None:
        receipt = receipt.model_copy(update={"reason": f"{receipt.reason} (gated on {decided['gated_on']})", **decided})
        log.warning("%s: not published: %s", name, receipt.reason)
        target.record_refusal(name, meta, receipt.reason)
    else:
        with timer("publish"):
            receipt = publish_verified(target, registry, name, bundle, meta,
                                       stage or recipe.spec.publish.stage, Path(repo_dir) if tag else None)
        receipt = receipt.model_copy(update=decided)
    write_receipt(Path(out_dir), receipt, recipe, bundle, evaluation)
    write_timings(timings_path, timer.seconds)
    return receipt


@dataclass(frozen=True)
class PublishCandidate:
    """Everything a publish check may look at; the checks below decide before anything is uploaded."""

    recipe: Recipe
    gpu: str
    bundle: Opened
    evaluation: Opened
    gate: GateReport
    metadata: dict[str, Any]


def accuracy_gate(candidate: PublishCandidate, name: str, registry: str) -> PublishDetails | None:
    # GATE_RULE: pass publishes; inconclusive publishes only where the recipe says so (eval.gates.inconclusive)
    return refusal(name, registry, candidate.gate) if not candidate.gate.publishes else None


def gated_on(scored_by: str, gate: GateReport) -> str:
    """The verdict that decided, e.g. "served: vllm 0.32.0 on cpu: X, INCONCLUSIVE, eval.gates.inconclusive
    refuse" (the policy the gate report was judged under, which the lineage check ties to the recipe)."""
    policy = f", eval.gates.inconclusive {'publish' if gate.inconclusive_publishes else 'refuse'}"
    return f"{scored_by}, {gate.verdict.upper()}{policy if gate.verdict == 'inconclusive' else ''}"


# The seam for further refusals: each check returns a refusal receipt (nothing is published, the
# registry records why) or None. Add checks here, e.g. "no engine loads this bundle" or "the served
# result fails the gate"; the first refusal wins.
PUBLISH_CHECKS: tuple[Callable[[PublishCandidate, str, str], PublishDetails | None], ...] = (accuracy_gate,)


def refuse(candidate: PublishCandidate, name: str, registry: str) -> PublishDetails | None:
    for check in PUBLISH_CHECKS:
        receipt = check(candidate, name, registry)
        if receipt is not None:
            return receipt
    return None


def publish_verified(registry, url: str, name: str, bundle: Opened, meta: dict[str, Any],
                     label: str | None, tag_repo: Path | None) -> PublishDetails:
    """Upload (nothing new when the newest version has this content), label, tag in git if asked."""
    result = registry.publish(bundle.path, name, meta)
    assigned = assign_stage(registry, result, label) if label else False
    tags = create_git_tags(tag_repo, result, label, assigned) if tag_repo is not None else ()
    log.info("%s %s %s (%s)", name, result.version, "published" if result.created else "already published",
             result.manifest_url)
    return PublishDetails(published=True, name=name, registry=url, version=result.version, created=result.created,
                          manifest_url=result.manifest_url, stage=label, tags=list(tags))


def check_bundle_target(recipe: Recipe, gpu: str, bundle: Opened) -> None:
    """The bundle is this recipe's target. That it was sized from the recipe's `targets.<gpu>` and
    `build` sections as they read now is checked by section digest in `check_lineage`."""
    where = f"bundle {bundle.path}"
    made_for = bundle.recipe_id
    if made_for != recipe.id or bundle.envelope.subject != recipe.artifact_name(gpu):
        raise RegistryError(where, f"is {bundle.envelope.subject!r} of recipe {made_for!r}, not "
                                   f"{recipe.artifact_name(gpu)!r} of {recipe.id!r}.",
                            f"pass --bundle data/bundles/{recipe.artifact_name(gpu)}.")


def read_gate(evaluation: Opened) -> GateReport:
    path = evaluation.path / GATE_REPORT_FILE
    try:
        return GateReport.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise StageInputError(str(path), "missing: the evaluation has no gate verdict.", RERUN) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StageInputError(str(path), f"is not a gate report ({exc!r}).", RERUN) from None


def refusal(name: str, registry: str, gate: GateReport) -> PublishDetails:
    failures = tuple({"metric": r.metric, "baseline": r.baseline, "quantized": r.quantized,
                      "recovery": json_number(r.recovery), "threshold": r.threshold, "reason": r.reason}
                     for r in gate.blocking)
    reason = f"accuracy gate {'failed' if gate.verdict == 'fail' else gate.verdict}: " + "; ".join(f"{f['metric']} {f['reason']}" for f in failures)
    return PublishDetails(published=False, name=name, registry=registry, reason=reason, gate_failures=list(failures))


def artifact_metadata(recipe: Recipe, gpu: str, spec: GpuSpec, bundle: Opened, evaluation: Opened,
                      gate: GateReport, lineage: tuple[Link, ...]) -> dict[str, Any]:
    """What a deployment system needs to choose this artifact, and where it came from."""
    details = bundle.details
    plan = details.plan.model_dump(exclude_none=True)
    fmt = FORMATS[recipe.spec.quant.format]
    modelopt = details.made_for.nvidia_modelopt or installed_version("nvidia-modelopt")
    runtime = {"tensorrt_llm": recipe.spec.build.tensorrt_llm_version, **({"modelopt": modelopt} if modelopt else {})}
    return {
        "model": recipe.model.name,
        "format": fmt.name,
        "kv_cache_dtype": recipe.spec.quant.kv_cache_dtype,
        "gpu": gpu,
        "gpu_name": spec.name,
        "compute_capability": details.compute_capability,
        "tp": details.tp,
        "engine": details.engine,
        "bits_per_weight": fmt.bits_per_weight,
        "runtime_versions": runtime,
        "memory_plan": memory_plan(plan),
        "min_gpu_memory_bytes": min_gpu_memory_bytes(plan),
        "load_tested": details.load_tested,
        # A lower-is-better metric gated on a maximum increase also carries that form (`forge list` states it so).
        "accuracy": {r.metric: {"baseline": r.baseline, "quantized": r.quantized,
                                "recovery": json_number(r.recovery), "threshold": r.threshold,
                                **({"increase": json_number(r.increase), "max_increase": r.max_increase}
                                   if r.form == "max_increase" else {})}
                     for r in gate.rows},
        "throughput": predicted_throughput(plan),
        "gate": {"verdict": gate.verdict, "metrics": len(gate.rows),
                 "report_sha256": sha256_file(evaluation.path / GATE_REPORT_FILE)},
        "recipe": {"id": recipe.id, "path": str(recipe.path),
                   "sections": {s: recipe.section_digest(s) for s in (*METADATA_SECTIONS, f"targets.{gpu}")}},
        "lineage": [asdict(link) for link in lineage],
    }


MEMORY_PLAN_KEYS = ("weights_bytes", "weights_bytes_per_gpu", "kv_bytes_per_token_per_gpu", "reserve_bytes",
                    "memory_bytes", "kv_pool_bytes", "kv_capacity_tokens", "max_batch_at_seq_len")


def memory_plan(plan: Mapping[str, Any]) -> dict[str, Any]:
    inputs = plan["inputs"]
    return {**{k: plan[k] for k in MEMORY_PLAN_KEYS}, "seq_len": inputs["seq_len"],
            "kv_cache_free_gpu_memory_fraction": inputs["kv_cache_free_gpu_memory_fraction"]}


def min_gpu_memory_bytes(plan: Mapping[str, Any]) -> int:
    """Smallest card (per GPU) that serves one request of max_seq_len with this bundle: weights +
    runtime reserve + KV for one sequence, whole pages of KV_BLOCK_TOKENS, divided by the share of
    free memory the runtime gives the KV pool (kv_cache_free_gpu_memory_fraction, as the planner)."""
    inputs = plan["inputs"]
    pages = math.ceil(inputs["seq_len"] / KV_BLOCK_TOKENS)
    kv_one_sequence = pages * KV_BLOCK_TOKENS * plan["kv_bytes_per_token_per_gpu"]
    return int(plan["weights_bytes_per_gpu"] + plan["reserve_bytes"]
               + math.ceil(kv_one_sequence / inputs["kv_cache_free_gpu_memory_fraction"]))


PREDICTED_RUN_KEYS = ("predicted_output_tok_s", "predicted_output_tok_s_per_gpu", "predicted_output_tok_s_per_user",
                      "predicted_ttft_ms", "predicted_tpot_ms", "predicted_joules_per_token", "predicted_usd_per_mtok")
CEILING_KEYS = ("decode_tok_s_batch1", "decode_tok_s_max_batch", "prefill_tok_s", "decode_batch")


def predicted_throughput(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The predicted run (`predicted_*`, what `forge list` shows) and the roofline (`ceiling_*`), named apart."""
    run = plan.get("throughput") or {}
    values = {k: run[k] for k in PREDICTED_RUN_KEYS if run.get(k) is not None}
    ceilings = {f"ceiling_{k}": plan[k] for k in CEILING_KEYS if plan.get(k) is not None}
    return {**values, **ceilings,
            "basis": "predicted_*: forge's model of trtllm-bench's offline run at ISL/OSL (pipeline/sizing/perfmodel.py; "
                     "per user and TTFT include queue wait), priced at that run; ceiling_*: the roofline from "
                     f"{plan.get('ceilings_source', 'datasheet')} rates, an upper bound"}


def assign_stage(registry, result: PublishResult, label: str) -> bool:
    """Point `label` at this version; True if the label moved (a re-run leaves it, and its history, alone)."""
    if registry.stages(result.name).get(label) == result.version:
        return False
    registry.assign_stage(result.name, result.version, label)
    return True


def create_git_tags(repo_dir: Path, result: PublishResult, label: str | None, assigned: bool) -> tuple[str, ...]:
    """GTO's tags (iterative/gto): `name@vX.Y.Z` registers the version, `name#stage#N` assigns a stage.
    A tag already there is kept (tags are immutable); the stage tag follows a new label or a new version tag."""
    created = []
    version_tag = f"{result.name}@{result.version}"
    message = f"forge publish {result.name} {result.version}"
    if not has_tag(repo_dir, version_tag):
        created.append(tag_version(repo_dir, result.name, result.version, message).tag)
    if label and (assigned or created):
        created.append(tag_stage(repo_dir, result.name, label, f"{message} -> {label}", version=result.version).tag)
    return tuple(created)


# What this run did, not what holds: a rerun finds the version there and creates nothing, so these stay
# on the returned receipt and in the log, out of the output (the same inputs and registry: the same bytes).
RUN_EVENTS = frozenset({"created", "tags"})


def write_receipt(out_dir: Path, receipt: PublishDetails, recipe: Recipe, bundle: Opened, evaluation: Opened) -> None:
    body = receipt.model_dump(exclude=set(RUN_EVENTS))
    with staged_output(out_dir) as tmp:
        write_json(tmp / RECEIPT_FILE, body)
        write_manifest(tmp, build_manifest(
            "publish", receipt.name, tmp,
            inputs={"bundle": bundle.input_entry(), "evaluation": evaluation.input_entry()},
            details=body, recipe=recipe.provenance("publish"),
        ))
