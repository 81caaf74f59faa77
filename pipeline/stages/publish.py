"""`forge publish`, `forge pull`, `forge list`: ship a gated bundle to the registry, and get the right
one back onto a serving machine.

publish (one DVC stage per model x format x GPU) refuses unless the bundle and its evaluation are
intact and chain back, manifest digest by manifest digest, to this recipe's calibrate output, its
calibration set and the downloaded model. A failed accuracy gate is a recorded result, not a crash:
the receipt in `--out` says why nothing was published, and the exit code is 0 so `dvc repro`
finishes (`--strict`: 1). Out (`--out`): `receipt.json` and `manifest.json`.

The registry is any kind pipeline/registries.py opens (directory, OCI, plain layout, HTTP); every kind
offers the same calls, so nothing here branches on it. pull verifies every file against the registry
manifest's sha256 before the destination appears (pipeline/pulling.py), and refuses an artifact built for another compute capability or another
TensorRT-LLM version unless `--force`. `forge pull MODEL --gpu auto` picks among a model's artifacts
the way NVIDIA NIM picks a profile: the local SKU, then fewer bits per weight, then the newest.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from pipeline.engines import require_loadable
from pipeline.errors import RecipeError, RegistryError, StageInputError
from pipeline.formats import FORMATS
from pipeline.gates import GateReport
from pipeline.gpu_detect import LocalGpu, detect_local_gpu
from pipeline.gpus import DEFAULT_CATALOG, GpuSpec, load_catalog
from pipeline.gto_tags import has_tag, tag_stage, tag_version
from pipeline.layout import GATE_REPORT_FILE, RECEIPT_FILE
from pipeline.manifest import (
    Timer,
    build_manifest,
    input_entry,
    manifest_digest,
    read_manifest,
    sha256_file,
    staged_output,
    verify_files,
    write_json,
    write_manifest,
)
from pipeline.recipe import Recipe, load_recipe
from pipeline.registries import open_registry
from pipeline.registry import (
    PASSING_VERDICT,
    ArtifactSummary,
    PublishResult,
    PullResult,
    select_for_gpu,
    validate_name,
)
from pipeline.selection import ProfileRow, profile_rows
from pipeline.serving.gate_source import choose_gate_source
from pipeline.sizing import KV_BLOCK_TOKENS
from pipeline.validate import check_named_target, validate_recipe

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "registry"  # a directory relative to the working directory (the repo root under DVC)
REGISTRY_ENV = "FORGE_REGISTRY"
RERUN = "re-run the pipeline so every stage sees the same upstream outputs (`dvc repro`), then publish again."
# Stages whose outputs a recipe drives (their manifests carry `recipe.id` and section digests), and
# the sections without which an output cannot be tied to the recipe at all.
RECIPE_STAGES = ("build", "evaluate", "calibrate", "calibration-set")
REQUIRED_SECTIONS = {"calibrate": ("model", "quant", "calibration"), "calibration-set": ("calibration",)}
# The chain the issue asks for: recipe -> calibration set -> downloaded model, under the bundle and its evaluation.
REQUIRED_LINKS = ("build", "evaluate", "calibrate", "calibration-set", "download")
# Recipe sections a published version depends on. `publish` is left out on purpose: relabelling
# (publish.stage) must not mint a new version of identical files.
METADATA_SECTIONS = ("model", "quant", "calibration", "eval", "build")

PUBLISH_EXAMPLE = """example:
  forge publish recipes/smollm2-135m-instruct/fp8.yaml --gpu h200 \\
      --bundle data/bundles/smollm2-135m-instruct-fp8-h200 --evaluation data/eval/smollm2-135m-instruct-fp8 \\
      --registry registry --out data/published/smollm2-135m-instruct-fp8-h200 [--tag] [--stage prod]
"""
PULL_EXAMPLE = """examples:
  forge pull smollm2-135m-instruct-fp8-h200 --dest /srv/models/smollm2      # newest version
  forge pull smollm2-135m-instruct-fp8-h200 --stage prod --dest /srv/models/smollm2
  forge pull smollm2-135m-instruct --gpu auto --dest /srv/models/smollm2    # best artifact for this GPU
  forge pull smollm2-135m-instruct --gpu h200 --dest out/                    # ... for a catalog GPU
  forge pull smollm2-135m-instruct-fp8-h200 --registry oci://registry.example.com/forge --dest out/
  forge pull smollm2-135m-instruct-fp8-h200 --registry https://models.example.com/forge --dest out/
registries: a directory or fsspec URL (s3://, gs://: extras forge-quant[s3], [gcs]); oci://HOST/NAMESPACE
(oci+http:// without TLS; credentials from the docker config or ORAS_USER/ORAS_PASS); plain+DIR (plain
layout); http(s):// (a plain layout served over HTTP, read only).
"""
LIST_EXAMPLE = """examples:
  forge list
  forge list --gpu h100          # every artifact, compatible or not with an H100, and why (as pull --gpu decides)
  forge list --gpu b200 --json
"""


# ---------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish a gated bundle whose lineage checks out to the artifact registry",
                       epilog=PUBLISH_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path, help="recipes/<model>/<variant>.yaml")
    p.add_argument("--gpu", required=True, help="the recipe target (GPU catalog key) the bundle was built for")
    p.add_argument("--bundle", required=True, type=Path, help="the build stage's output directory")
    p.add_argument("--evaluation", required=True, type=Path, help="the evaluate stage's output directory")
    p.add_argument("--served-evaluation", type=Path,
                   help="the serve-eval stage's output: gate on it where the bundle was served (else on --evaluation)")
    p.add_argument("--out", required=True, type=Path, help="where the receipt goes (replaced atomically)")
    p.add_argument("--stage", help="stage label to assign, e.g. prod (default: the recipe's publish.stage)")
    p.add_argument("--tag", action="store_true", help="also create GTO git tags name@vX.Y.Z / name#stage#N here")
    p.add_argument("--strict", action="store_true", help="exit 1 when the accuracy gate failed (default: 0)")
    _add_registry_options(p)
    p.set_defaults(func=run_publish)

    p = sub.add_parser("pull", help="download and verify an artifact (by name, or the best one for a GPU)",
                       epilog=PULL_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="an artifact name, or with --gpu a model name to choose an artifact for")
    p.add_argument("--dest", required=True, type=Path, help="a new (or empty) directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="vX.Y.Z (default: the newest)")
    which.add_argument("--stage", help="the version a stage label points at, e.g. prod")
    p.add_argument("--gpu", help="'auto' (NVML) or a GPU catalog key: the GPU the artifact will run on. "
                                 "Default: the local GPU when NVML finds one, else no compute-capability check")
    p.add_argument("--count", type=int, help="GPUs of that kind available (default: as detected, or 1)")
    p.add_argument("--force", action="store_true", help="pull despite a compute capability or runtime mismatch")
    _add_registry_options(p)
    p.set_defaults(func=run_pull)

    p = sub.add_parser("list", help="artifacts in the registry: versions, stages, format, GPU, key metrics",
                       epilog=LIST_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", help="a GPU catalog key: show each artifact's compatibility with it, and which "
                                 "one `forge pull MODEL --gpu` would take")
    p.add_argument("--count", type=int, help="GPUs of that kind available (default 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_registry_options(p)
    p.set_defaults(func=run_list)


def _add_registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", help=f"directory, fsspec URL, oci://HOST/NAMESPACE, plain+DIR or http(s):// "
                                      f"(default: ${REGISTRY_ENV}, else ./{DEFAULT_REGISTRY})")
    p.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG, help="GPU catalog (default: %(default)s)")


def registry_url(args: argparse.Namespace) -> str:
    return args.registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


def run_publish(args: argparse.Namespace) -> int:
    receipt = main(args.recipe, args.gpu, args.bundle, args.evaluation, registry_url(args), args.out,
                   stage=args.stage, tag=args.tag, repo_dir=Path.cwd(), catalog_path=args.catalog,
                   served_evaluation_dir=args.served_evaluation)
    return 1 if args.strict and receipt.gate_failed else 0


def run_pull(args: argparse.Namespace) -> int:
    validate_name(args.target, kind="artifact or model name")  # before anything else looks at it
    catalog = load_catalog(args.catalog)
    local_gpu = resolve_gpu(args.gpu, catalog, args.count)
    result = pull_main(args.target, args.dest, registry_url(args), local_gpu, local_runtime_versions(),
                       version=args.version, stage=args.stage, select=args.gpu is not None, force=args.force,
                       progress=sys.stderr.isatty())
    print(f"pulled {result.name} {result.version} into {result.dest}: {result.files} files, "
          f"{result.total_bytes / 1e6:,.1f} MB, every file's sha256 verified against the registry manifest"
          + (f" (forced past: {'; '.join(result.overridden)})" if result.overridden else ""))
    return 0


def run_list(args: argparse.Namespace) -> int:
    url = registry_url(args)
    if args.gpu is not None:
        catalog = load_catalog(args.catalog)
        if args.gpu not in catalog:
            raise RecipeError("--gpu", f"unknown GPU {args.gpu!r}.",
                              f"use one of {', '.join(catalog)} (pipeline/data/gpus.yaml).")
        rows, problems = profiles_main(url, resolve_gpu(args.gpu, catalog, args.count))
        if args.json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
        else:
            render_profiles(url, args.gpu, rows)
    else:
        summaries, problems = list_main(url)
        if args.json:
            print(json.dumps([asdict(s) for s in summaries], indent=2))
        else:
            render_list(url, summaries)
    for problem in problems:
        print(f"warning: skipped unreadable {problem}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- publish


@dataclass(frozen=True)
class Receipt:
    """What `--out` records. `published`: this bundle is in the registry (as `version`);
    `created`: this run wrote that version (False when an identical one was already there)."""

    published: bool
    name: str
    registry: str
    version: str | None = None
    created: bool = False
    manifest_url: str | None = None
    stage: str | None = None
    tags: tuple[str, ...] = ()
    reason: str | None = None
    gate_failures: tuple[dict[str, Any], ...] = ()

    @property
    def gate_failed(self) -> bool:
        return not self.published and bool(self.gate_failures)


@dataclass(frozen=True)
class Verified:
    """A stage output whose files match its manifest."""

    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str


@dataclass(frozen=True)
class Link:
    """One manifest of the lineage, as found on disk and matching what its consumer recorded."""

    stage: str
    subject: str | None
    path: str
    manifest_sha256: str


def main(recipe_path: Path, gpu: str, bundle_dir: Path, evaluation_dir: Path, registry: str, out_dir: Path, *,
         stage: str | None = None, tag: bool = False, repo_dir: Path = Path("."),
         catalog_path: Path = DEFAULT_CATALOG, served_evaluation_dir: Path | None = None) -> Receipt:
    timer = Timer()
    recipe = load_recipe(Path(recipe_path))
    catalog = load_catalog(Path(catalog_path))
    validate_recipe(recipe, catalog)
    check_named_target(recipe, gpu, catalog)
    name = validate_name(recipe.artifact_name(gpu))
    with timer("verify"):
        bundle = read_verified(Path(bundle_dir), "build")
        source = choose_gate_source(Path(evaluation_dir), served_evaluation_dir, Path(bundle_dir))
        evaluation = read_verified(source.evaluation_dir, "evaluate")
        check_bundle_target(recipe, gpu, bundle)
        # Nothing unloadable is published: the build's engine-contract table must name a loader.
        require_loadable((bundle.manifest.get("details") or {}).get("compatibility") or [], f"bundle {bundle.path}")
        lineage = check_lineage(recipe, name, bundle, evaluation)
        gate = read_gate(evaluation)
    meta = artifact_metadata(recipe, gpu, catalog[gpu], bundle, evaluation, gate, lineage)
    meta["gate"]["scored_by"] = source.scored_by
    target = open_registry(registry)
    receipt = refuse(PublishCandidate(recipe, gpu, bundle, evaluation, gate, meta), name, registry)
    if receipt is not None:
        if served_evaluation_dir is not None:  # the verdict says whether served or simulated scores failed
            receipt = replace(receipt, reason=f"{receipt.reason} (gated on {source.scored_by})")
        log.warning("%s: not published: %s", name, receipt.reason)
        target.record_refusal(name, meta, receipt.reason)
    else:
        meta = artifact_metadata(recipe, gpu, catalog[gpu], bundle, evaluation, gate, lineage)
        meta["gate"]["scored_by"] = source.scored_by
        with timer("publish"):
            receipt = publish_verified(target, registry, name, bundle, meta,
                                       stage or recipe.spec.publish.stage, Path(repo_dir) if tag else None)
    write_receipt(Path(out_dir), receipt, recipe, bundle, evaluation, timer)
    return receipt


@dataclass(frozen=True)
class PublishCandidate:
    """Everything a publish check may look at; the checks below decide before anything is uploaded."""

    recipe: Recipe
    gpu: str
    bundle: Verified
    evaluation: Verified
    gate: GateReport
    metadata: dict[str, Any]


def accuracy_gate(candidate: PublishCandidate, name: str, registry: str) -> Receipt | None:
    # pass publishes; inconclusive publishes only where the recipe says so (eval.gates.inconclusive)
    return refusal(name, registry, candidate.gate) if not candidate.gate.publishes else None


# The seam for further refusals: each check returns a refusal Receipt (nothing is published, the
# registry records why) or None. Add checks here, e.g. "no engine loads this bundle" or "the served
# result fails the gate"; the first refusal wins.
PUBLISH_CHECKS: tuple[Callable[[PublishCandidate, str, str], Receipt | None], ...] = (accuracy_gate,)


def refuse(candidate: PublishCandidate, name: str, registry: str) -> Receipt | None:
    for check in PUBLISH_CHECKS:
        receipt = check(candidate, name, registry)
        if receipt is not None:
            return receipt
    return None


def publish_verified(registry, url: str, name: str, bundle: Verified, meta: dict[str, Any],
                     label: str | None, tag_repo: Path | None) -> Receipt:
    """Upload (nothing new when the newest version has this content), label, tag in git if asked."""
    result = registry.publish(bundle.path, name, meta)
    assigned = assign_stage(registry, result, label) if label else False
    tags = create_git_tags(tag_repo, result, label, assigned) if tag_repo is not None else ()
    log.info("%s %s %s (%s)", name, result.version, "published" if result.created else "already published",
             result.manifest_url)
    return Receipt(True, name, url, result.version, result.created, result.manifest_url, label, tags)


def read_verified(directory: Path, stage: str) -> Verified:
    manifest = read_manifest(directory, stage)
    verify_files(directory, manifest)
    return Verified(directory, manifest, manifest_digest(directory))


def check_bundle_target(recipe: Recipe, gpu: str, bundle: Verified) -> None:
    """The bundle is this recipe's target. That it was sized from the recipe's `targets.<gpu>` and
    `build` sections as they read now is checked by section digest in `check_lineage`."""
    where = f"bundle {bundle.path}"
    made_for = (bundle.manifest.get("recipe") or {}).get("id")
    if made_for != recipe.id or bundle.manifest.get("subject") != recipe.artifact_name(gpu):
        raise RegistryError(where, f"is {bundle.manifest.get('subject')!r} of recipe {made_for!r}, not "
                                   f"{recipe.artifact_name(gpu)!r} of {recipe.id!r}.",
                            f"pass --bundle data/bundles/{recipe.artifact_name(gpu)}.")


def check_lineage(recipe: Recipe, name: str, bundle: Verified, evaluation: Verified) -> tuple[Link, ...]:
    """Walk every recorded input, digest by digest, from the bundle and the evaluation down to the
    downloaded model; each manifest must be the one on disk now and, for recipe-driven stages,
    have read the recipe's sections as they are now. Returns the links, sorted."""
    where = f"lineage of {name}"
    bundle_calibrate = _input_of_stage(bundle, "calibrate", where)
    evaluated_calibrate = _input_of_stage(evaluation, "calibrate", where)
    if bundle_calibrate["manifest_sha256"] != evaluated_calibrate["manifest_sha256"]:
        raise RegistryError(
            where,
            f"the bundle ({bundle.path}) was built from calibrate manifest {bundle_calibrate['manifest_sha256'][:12]}… "
            f"but the evaluation ({evaluation.path}) scored calibrate manifest "
            f"{evaluated_calibrate['manifest_sha256'][:12]}…: its accuracy figures are not this bundle's.", RERUN)
    found: dict[tuple[str, str], Link] = {}
    pending = [(bundle.path, bundle.manifest, bundle.manifest_sha256), (evaluation.path, evaluation.manifest,
                                                                          evaluation.manifest_sha256)]
    while pending:
        directory, manifest, digest = pending.pop(0)
        link = Link(manifest["stage"], manifest.get("subject"), str(directory), digest)
        if (link.path, digest) in found:
            continue
        found[(link.path, digest)] = link
        check_recipe_record(recipe, link, manifest.get("recipe"), where)
        for key, entry in sorted((manifest.get("inputs") or {}).items()):
            child = Path(entry["path"])
            described = f"link {link.stage} {directory} -> {key} ({entry['stage']} {child})"
            current = _current_digest(child, described, where)
            if current != entry["manifest_sha256"]:
                raise RegistryError(
                    where, f"{described} is broken: it was made from manifest {entry['manifest_sha256'][:12]}…, "
                           f"{child} now holds {current[:12]}….", RERUN)
            pending.append((child, read_manifest(child, entry["stage"]), current))
    stages = {link.stage for link in found.values()}
    missing = [s for s in REQUIRED_LINKS if s not in stages]
    if missing:
        raise RegistryError(where, f"does not reach {', '.join(missing)}: the bundle cannot be traced back to the "
                                   "downloaded model and calibration set.", RERUN)
    return tuple(sorted(found.values(), key=lambda link: (REQUIRED_LINKS.index(link.stage)
                                                          if link.stage in REQUIRED_LINKS else len(REQUIRED_LINKS),
                                                          link.path)))


def _input_of_stage(output: Verified, stage: str, where: str) -> dict[str, Any]:
    entries = [e for e in (output.manifest.get("inputs") or {}).values() if e.get("stage") == stage]
    if len(entries) != 1:
        raise RegistryError(where, f"{output.path} records {len(entries)} {stage} inputs, expected exactly one.", RERUN)
    return entries[0]


def _current_digest(directory: Path, link: str, where: str) -> str:
    try:
        return manifest_digest(directory)
    except FileNotFoundError:
        raise RegistryError(where, f"{link} is broken: {directory} has no manifest any more.", RERUN) from None


def check_recipe_record(recipe: Recipe, link: Link, record: Mapping[str, Any] | None, where: str) -> None:
    """A recipe-driven output was made for this recipe, from its sections as they read now."""
    if link.stage not in RECIPE_STAGES:
        return
    record = record or {}
    if record.get("id") != recipe.id:
        raise RegistryError(where, f"{link.stage} output {link.path} was made for recipe {record.get('id')!r}, "
                                   f"not {recipe.id!r}.", RERUN)
    sections = record.get("sections") or {}
    missing = [s for s in REQUIRED_SECTIONS.get(link.stage, ()) if s not in sections]
    if missing:
        raise RegistryError(where, f"{link.stage} output {link.path} records no digest of recipe section(s) "
                                   f"{', '.join(missing)}, so it cannot be tied to {recipe.path}.", RERUN)
    for section, digest in sorted(sections.items()):
        try:
            current = recipe.section_digest(section)
        except KeyError:
            raise RegistryError(where, f"{link.stage} output {link.path} was made from section {section!r}, which "
                                       f"{recipe.path} no longer has.", RERUN) from None
        if current != digest:
            raise RegistryError(where, f"{link.stage} output {link.path} was made from another `{section}` section of "
                                       f"{recipe.path} (digest {digest[:12]}…, now {current[:12]}…).", RERUN)


def read_gate(evaluation: Verified) -> GateReport:
    path = evaluation.path / GATE_REPORT_FILE
    try:
        return GateReport.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise StageInputError(str(path), "missing: the evaluation has no gate verdict.", RERUN) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StageInputError(str(path), f"is not a gate report ({exc!r}).", RERUN) from None


def refusal(name: str, registry: str, gate: GateReport) -> Receipt:
    failures = tuple({"metric": r.metric, "baseline": r.baseline, "quantized": r.quantized,
                      "recovery": _json_number(r.recovery), "threshold": r.threshold, "reason": r.reason}
                     for r in gate.blocking)
    reason = f"accuracy gate {'failed' if gate.verdict == 'fail' else gate.verdict}: " + "; ".join(f"{f['metric']} {f['reason']}" for f in failures)
    return Receipt(False, name, registry, reason=reason, gate_failures=failures)


def artifact_metadata(recipe: Recipe, gpu: str, spec: GpuSpec, bundle: Verified, evaluation: Verified,
                      gate: GateReport, lineage: tuple[Link, ...]) -> dict[str, Any]:
    """What a deployment system needs to choose this artifact, and where it came from."""
    details = bundle.manifest["details"]
    plan = details["plan"]
    fmt = FORMATS[recipe.spec.quant.format]
    modelopt = (details.get("made_for") or {}).get("nvidia-modelopt") or _installed("nvidia-modelopt")
    runtime = {"tensorrt_llm": recipe.spec.build.tensorrt_llm_version, **({"modelopt": modelopt} if modelopt else {})}
    return {
        "model": recipe.model.name,
        "format": fmt.name,
        "kv_cache_dtype": recipe.spec.quant.kv_cache_dtype,
        "gpu": gpu,
        "gpu_name": spec.name,
        "compute_capability": details["compute_capability"],
        "tp": details["tp"],
        "engine": details["engine"],
        "bits_per_weight": fmt.bits_per_weight,
        "runtime_versions": runtime,
        "memory_plan": memory_plan(plan),
        "min_gpu_memory_bytes": min_gpu_memory_bytes(plan),
        "load_tested": bool(details.get("load_tested")),
        "accuracy": {r.metric: {"baseline": r.baseline, "quantized": r.quantized,
                                "recovery": _json_number(r.recovery), "threshold": r.threshold}
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


def predicted_throughput(plan: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("decode_tok_s_batch1", "decode_tok_s_max_batch", "prefill_tok_s", "decode_batch")
    values = {f"predicted_{k}": plan[k] for k in keys if plan.get(k) is not None}
    return {**values, "basis": f"predicted: roofline ceiling from {plan.get('ceilings_source', 'datasheet')} rates "
                               "(forge plan); TensorRT-LLM reaches ~30-40% of it"}


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


def write_receipt(out_dir: Path, receipt: Receipt, recipe: Recipe, bundle: Verified, evaluation: Verified,
                  timer: Timer) -> None:
    body = asdict(receipt)
    with staged_output(out_dir) as tmp:
        write_json(tmp / RECEIPT_FILE, body)
        write_manifest(tmp, build_manifest(
            "publish", receipt.name, tmp,
            inputs={"bundle": input_entry(bundle.path, "build"),
                    "evaluation": input_entry(evaluation.path, "evaluate")},
            timings=timer.seconds, details=body, recipe=recipe.provenance("publish"),
        ))


# ---------------------------------------------------------------------------- pull


def resolve_gpu(gpu: str | None, catalog: Mapping[str, GpuSpec], count: int | None) -> LocalGpu | None:
    """The GPU the pulled artifact will run on: detected (`auto`, or by default when NVML finds one),
    or a catalog GPU described by its datasheet values."""
    if gpu is None or gpu == "auto":
        detected = detect_local_gpu({key: spec.nvml_names for key, spec in catalog.items()})
        if detected is None and gpu == "auto":
            raise RegistryError("--gpu auto", "no NVIDIA GPU detected (NVML found no device).",
                                f"pass --gpu <key>, one of {', '.join(catalog)}.")
        if detected is None:
            log.info("no local NVIDIA GPU detected: compute capability not checked (pass --gpu KEY to check)")
            return None
        return detected if count is None else LocalGpu(detected.name, detected.compute_capability,
                                                       detected.memory_bytes, count, detected.sku)
    if gpu not in catalog:
        raise RegistryError("--gpu", f"unknown GPU {gpu!r}.", f"use 'auto' or one of {', '.join(catalog)}.")
    spec = catalog[gpu]
    return LocalGpu(spec.name, spec.compute_capability, spec.memory_bytes, count or 1, gpu)


def local_runtime_versions() -> dict[str, str | None]:
    """Runtimes a bundle is bound to, as installed here; None = not installed, so not compared."""
    return {"tensorrt_llm": _installed("tensorrt-llm")}


def pull_main(target: str, dest: Path, registry_url: str, local_gpu: LocalGpu | None,
              runtime_versions: Mapping[str, str | None], *, version: str | None = None, stage: str | None = None,
              select: bool = False, force: bool = False, progress: bool = False) -> PullResult:
    registry = open_registry(registry_url)
    name, version = choose_artifact(registry, target, local_gpu, version, stage, select)
    return registry.pull(name, dest, version=version, stage=stage, force=force,
                         local_gpu=local_gpu, runtime_versions=runtime_versions, progress=progress)


def choose_artifact(registry, target: str, local_gpu: LocalGpu | None, version: str | None,
                    stage: str | None, select: bool) -> tuple[str, str | None]:
    """`target` names an artifact: pull it. Else, with `select` (a --gpu was given), it names a
    model: choose among its artifacts NIM-style (registry.select_for_gpu)."""
    validate_name(target, kind="artifact or model name")
    if target in registry.names():
        return target, version
    if not select:
        if registry.manifests(model=target):
            raise RegistryError(f"registry {registry.url}", f"{target!r} is a model, not an artifact.",
                                "pass --gpu auto (or --gpu <catalog key>) to choose one of its artifacts, or pull "
                                "an artifact by name (`forge list`).")
        registry.resolve(target)  # raises: no such artifact (lists those there are)
    if version is not None or stage is not None:  # chosen below, by GPU
        raise RegistryError(f"model {target}", "--version / --stage pick a version of one artifact; for a model "
                                               "the version is chosen by GPU.", "pull an artifact by name to pin one.")
    if local_gpu is None:
        raise RegistryError(f"model {target}", "no NVIDIA GPU detected; nothing to choose an artifact for.",
                            "pass --gpu <catalog key>.")
    candidates = registry.manifests(model=target)
    refused = [r for r in registry.refusals() if (r.get("metadata") or {}).get("model") == target]
    if not candidates and not refused:
        raise RegistryError(f"registry {registry.url}", f"has no artifact or model named {target!r} "
                                                        f"(artifacts: {', '.join(registry.names()) or 'none'}).",
                            "run `forge list` and pull one of those.")
    chosen = select_for_gpu(candidates, local_gpu)
    if chosen is None:
        reasons = "; ".join(f"{r.name}{' ' + r.version if r.version else ''}: {r.reason}"
                            for r in profile_rows(candidates, refused, local_gpu, model=target))
        raise RegistryError(f"model {target}", f"no artifact fits {local_gpu.name} "
                                               f"(compute capability {local_gpu.compute_capability}): {reasons}.",
                            "build one for this GPU (add a target to the recipe), or pull one by name with --force. "
                            f"`forge list --gpu {local_gpu.sku or '<key>'}` shows the same rows.")
    exact = local_gpu.sku is not None and chosen["metadata"].get("gpu") == local_gpu.sku
    log.info("selected %s %s for %s: %s, %s bits/weight", chosen["name"], chosen["version"], local_gpu.name,
             "built for this SKU" if exact else f"built for {chosen['metadata'].get('gpu')} (same compute capability)",
             chosen["metadata"].get("bits_per_weight"))
    return chosen["name"], chosen["version"]


# ---------------------------------------------------------------------------- list


def list_main(registry_url: str) -> tuple[list[ArtifactSummary], list[str]]:
    """Every artifact's summary, and the unreadable manifests skipped (named, not fatal)."""
    registry = open_registry(registry_url)
    return registry.list_artifacts(), registry.problems


def profiles_main(registry_url: str, gpu: LocalGpu) -> tuple[list[ProfileRow], list[str]]:
    """Each artifact's compatibility with `gpu`, by the rule `forge pull MODEL --gpu` uses."""
    registry = open_registry(registry_url)
    rows = profile_rows(registry.manifests(), registry.refusals(), gpu)
    return rows, registry.problems


def render_profiles(url: str, gpu_key: str, rows: list[ProfileRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        print(f"no artifacts in registry {url}")
        return
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=200)
    if console.width < 140:  # too narrow for the table's reasons: one line per artifact, nothing cut
        print(f"{url}: artifacts for {gpu_key}")
        for r in rows:
            verdict = "SELECTED" if r.selected else ("compatible" if r.compatible else "incompatible")
            print(f"  {r.name} {r.version or '-'}  {verdict}: {r.reason}")
        return
    table = Table(title=f"{url}: artifacts for {gpu_key}", header_style="bold")
    table.add_column("name", no_wrap=True, min_width=max(len(r.name) for r in rows))  # copied by users: never cut
    for column in ("version", "format", "built for", "cc", "compatible"):
        table.add_column(column, no_wrap=True)
    table.add_column("why", overflow="fold", min_width=20)
    for r in rows:
        table.add_row(r.name, r.version or "-", r.format, r.gpu, r.compute_capability,
                      "SELECTED" if r.selected else ("yes" if r.compatible else "no"), r.reason)
    console.print(table)


def key_metrics(summary: ArtifactSummary) -> dict[str, float | None]:
    recoveries = [v for k, v in summary.metrics.items() if k.startswith("accuracy.") and k.endswith(".recovery")]
    return {"min_recovery": min(recoveries) if recoveries else None,
            "predicted_decode_tok_s": summary.metrics.get("throughput.predicted_decode_tok_s_max_batch")}


def render_list(url: str, summaries: list[ArtifactSummary]) -> None:
    from rich.table import Table

    if not summaries:
        print(f"no artifacts in registry {url}")
        return
    from pipeline.tables import print_table  # widens the console so no name is ever cut

    table = Table(title=f"artifacts in {url}", header_style="bold")
    for column in ("name", "versions", "stages", "format", "bits/w", "gpu", "cc", "gate", "min recovery",
                   "decode tok/s (predicted)"):
        table.add_column(column, justify="right" if column in ("bits/w", "min recovery", "decode tok/s (predicted)")
                         else "left")
    for s in summaries:
        metrics = key_metrics(s)
        versions = s.latest if len(s.versions) == 1 else f"{s.latest} ({len(s.versions)} versions)"
        stages = ", ".join(f"{stage}->{v}" for stage, v in sorted(s.stages.items())) or "-"
        table.add_row(s.name, versions, stages, s.format, f"{s.bits_per_weight:g}", s.gpu, s.compute_capability,
                      s.gate_verdict, _fmt(metrics["min_recovery"], ".3f"),
                      _fmt(metrics["predicted_decode_tok_s"], ",.0f"))
    print_table(table)


# ---------------------------------------------------------------------------- helpers


def _installed(distribution: str) -> str | None:
    try:
        return importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return None


def _json_number(value: float | None) -> float | str | None:
    # Strict JSON has no infinity; the gate report spells it "inf" (pipeline/gates.py).
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
