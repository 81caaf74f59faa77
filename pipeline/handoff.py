"""What each stage leaves for the next one, as closed pydantic models, and the one reader of it.

Every stage's `manifest.json` (pipeline/manifest.py writes the envelope) carries `details`; the
model for each stage kind is in DETAILS below. `build_manifest` validates a writer's details against
it (a typo in a key fails the writer, not a reader three stages later) and `open_upstream` is the
only way a stage reads another stage's output: it checks, in this order,
  1. the manifest exists, has forge's schema and is of the expected stage kind;
  2. envelope and details match their models (a wrong type names the file, the field and the fix);
  3. every file listed is on disk with its digest, nothing unlisted was added;
  4. when a recipe is given, the output was made for that recipe id (a missing id is refused) and
     from the named sections as they read now (a missing section digest is refused);
and returns an `Opened` whose `.details` is the typed model. The models are closed
(`extra="forbid"`): a new field is added here first, then written. Fields a downstream stage reads
are required; descriptive fields are optional, so older hand-made test manifests still load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import StageInputError
from pipeline.manifest import MANIFEST_NAME, SCHEMA, manifest_digest, verify_files

# Numbers keep the type they were written with (a smart union: 9216 stays 9216, not 9216.0), so a
# value copied from a handoff into published metadata serialises to the same bytes as before.
Number = int | float


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


# ---------------------------------------------------------------------------- the envelope


class RecipeRecord(Closed):
    """`recipe.provenance(...)`; the baseline (driven by model.yaml) records `model` instead of `id`."""

    id: str | None = None
    model: str | None = None
    path: str
    sections: dict[str, str]


class InputRecord(Closed):
    path: str
    stage: str
    manifest_sha256: str
    subject: str | None = None


class FileRecord(Closed):
    sha256: str
    size: int


class Envelope(Closed):
    schema_: Literal["forge.manifest/1"] = Field(alias="schema")
    stage: str
    subject: str | None
    created: str
    recipe: RecipeRecord | None
    inputs: dict[str, InputRecord]
    files: dict[str, FileRecord]
    tools: dict[str, str | None]
    timings: dict[str, Number]
    details: dict[str, Any]


# ---------------------------------------------------------------------------- details, stage by stage


class DownloadDetails(Closed):
    source: dict[str, Any] | None = None
    smoke_prompt: str | None = None
    smoke_completion: str | None = None
    model_recipe: dict[str, Any] | None = None


class CalibrationSetDetails(Closed):
    set: str | None = None
    calibration_rows: int | None = None
    heldout_rows: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    chat_template: bool | None = None
    tensors_sha256: str | None = None
    documents_used: int | None = None
    set_spec: dict[str, Any] | None = None


class CalibrateResults(Closed):
    """Held-out perplexity and cost of the calibrate run (the report reads these)."""

    perplexity_baseline: Number
    perplexity_quantized: Number
    perplexity_delta_pct: Number | None = None
    heldout_tokens: int | None = None
    calibration_tokens: int | None = None
    calibrate_seconds: Number | None = None
    stage_seconds: Number | None = None
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    checkpoint_bytes: int | None = None
    # pipeline/quant/bits.py: bits per decoder-Linear weight (scales counted), and over the checkpoint.
    effective_bits: Number | None = None
    whole_checkpoint_bits: Number | None = None
    quantize_seconds: Number | None = None
    path: str | None = None


class CalibrateDetails(Closed):
    results: CalibrateResults | None = None
    format: str | None = None
    kv_cache_dtype: str | None = None
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    modelopt_config: str | None = None
    exclude: list[str] | None = None
    # quant.algorithm / quant.overrides / quant.auto as run (pipeline/quant/algorithms.py, mixed.py).
    algorithm: str | None = None
    overrides: dict[str, str] | None = None
    auto: dict[str, Any] | None = None
    layer_formats: dict[str, int] | None = None
    bits: dict[str, Any] | None = None
    device: str | None = None
    dtype: str | None = None
    calibration_batches: int | None = None
    quantizers: dict[str, Any] | None = None
    simulation: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None


class PlanRecord(Closed):
    """`pipeline.sizing.Plan.to_json()`: the memory plan and the flattened roofline. Publish's
    memory plan and throughput's agreement check read it; roofline keys are absent when nothing fits."""

    inputs: dict[str, Any]
    params: int
    params_by_component: dict[str, int]
    weights_bytes: int
    weights_bytes_per_gpu: int
    kv_bytes_per_token: Number
    kv_bytes_per_token_per_gpu: Number
    memory_bytes: int
    reserve_bytes: int
    memory_left_for_kv_bytes: int
    kv_pool_bytes: int
    kv_capacity_tokens: int
    max_batch_at_seq_len: int
    fits: bool
    why_not: str | None
    min_tp: int | None
    throughput: dict[str, Any]
    predicted: list[str]
    decode_tok_s_batch1: Number | None = None
    decode_bound_batch1: str | None = None
    decode_batch: int | None = None
    decode_tok_s_max_batch: Number | None = None
    decode_bound_max_batch: str | None = None
    decode_tok_s_per_user_max_batch: Number | None = None
    prefill_tok_s: Number | None = None
    joules_per_token: Number | None = None
    usd_per_mtok: Number | None = None
    ceilings_source: str | None = None
    predicted_output_tok_s: Number | None = None
    predicted_output_tok_s_per_gpu: Number | None = None
    roofline_is: str | None = None


class MadeFor(Closed):
    tensorrt_llm: str
    nvidia_modelopt: str | None = Field(default=None, alias="nvidia-modelopt")


class CompatibilityRow(Closed):
    """One row of `pipeline.engines.compatibility_table` (engines.Verdict.to_dict)."""

    engine: str
    version: str
    device: str
    loads: bool
    reason: str
    flags: list[str]


class BuildDetails(Closed):
    model: str
    format: str
    kv_cache_dtype: str
    gpu: str
    gpu_name: str
    compute_capability: str
    tp: int
    engine: str
    made_for: MadeFor
    quant_algo: str
    kv_cache_quant_algo: str | None
    checkpoint: dict[str, Any]
    llm_api_options: dict[str, Any]
    plan: PlanRecord
    load_tested: bool
    load_test: dict[str, Any]
    compatibility: list[CompatibilityRow] = []


class BaselineDetails(Closed):
    suite: str | None = None
    suite_sha256: str | None = None
    path: str | None = None
    metrics: dict[str, Number] | None = None


class EvaluateDetails(Closed):
    suite: str | None = None
    path: str | None = None
    verdict: str | None = None
    failed: list[str] | None = None
    simulation: dict[str, Any] | None = None
    served: dict[str, Any] | None = None


class NotServedDetails(Closed):
    """A served evaluation (or served baseline) that no engine here could run: a result, not a failure."""

    served: Literal[False]
    reason: str


class ThroughputDetails(Closed):
    """The numbers are in throughput.json (the report reads that file); the manifest only chains."""


class PublishDetails(Closed):
    """`stages.publish.Receipt`, as written to receipt.json."""

    published: bool
    name: str
    registry: str
    version: str | None = None
    created: bool = False
    manifest_url: str | None = None
    stage: str | None = None
    tags: list[str] = []
    reason: str | None = None
    gate_failures: list[dict[str, Any]] = []


# A kind with two models: the first that validates wins (served evaluations may be "not served").
DETAILS: dict[str, tuple[type[Closed], ...]] = {
    "download": (DownloadDetails,),
    "calibration-set": (CalibrationSetDetails,),
    "calibrate": (CalibrateDetails,),
    "build": (BuildDetails,),
    "baseline": (BaselineDetails, NotServedDetails),
    "evaluate": (EvaluateDetails, NotServedDetails),
    "throughput": (ThroughputDetails,),
    "publish": (PublishDetails,),
}

D = TypeVar("D", bound=Closed)


# ---------------------------------------------------------------------------- validation


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _problem(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    first = exc.errors()[0]
    field = prefix + _field(first["loc"])
    kind, given = first["type"], first.get("input")
    if kind == "extra_forbidden":
        return field, "is not a field of this stage's handoff model"
    if kind == "missing":
        return field, "is missing"
    return field, f"{first['msg'].lower()} (found {type(given).__name__} {given!r:.60})"


def check_details(stage: str, details: dict[str, Any], where: str) -> Closed:
    """The typed details of a `stage` manifest, or one StageInputError naming the field."""
    models = DETAILS.get(stage)
    if models is None:
        raise StageInputError(where, f"stage kind {stage!r} has no handoff model.",
                              f"add one to DETAILS in pipeline/handoff.py (known: {', '.join(DETAILS)}).")
    errors: list[ValidationError] = []
    for model in models:
        try:
            return model.model_validate(details)
        except ValidationError as exc:
            errors.append(exc)
    field, problem = _problem(errors[0], "details.")
    raise StageInputError(
        where, f"{field} {problem}: it does not match the {stage} handoff model {models[0].__name__}.",
        f"re-run the {stage} stage with this forge (`dvc repro {stage}@...`); if the writer changed on purpose, "
        f"change {models[0].__name__} in pipeline/handoff.py to match and every reader with it.")


def check_envelope(manifest: dict[str, Any], where: str) -> Envelope:
    try:
        return Envelope.model_validate(manifest)
    except ValidationError as exc:
        field, problem = _problem(exc)
        raise StageInputError(where, f"manifest field {field} {problem}.",
                              "re-run the stage that wrote it (`dvc repro`); manifests are written by "
                              "pipeline/manifest.py:build_manifest only.") from None


# ---------------------------------------------------------------------------- the reader


@dataclass(frozen=True)
class Opened(Generic[D]):
    """A verified upstream output: its directory, typed envelope and details, and manifest digest."""

    path: Path
    envelope: Envelope
    details: D
    digest: str

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as a plain dict (for the lineage walk and records; not for reading fields)."""
        return self.envelope.model_dump(mode="json", by_alias=True)

    @property
    def recipe_id(self) -> str | None:
        return self.envelope.recipe.id if self.envelope.recipe else None

    def input_entry(self) -> dict[str, Any]:
        """How a consumer records this output among its `inputs` (same shape as manifest.input_entry)."""
        return {"path": str(self.path), "stage": self.envelope.stage, "manifest_sha256": self.digest,
                "subject": self.envelope.subject}

    def input_of_stage(self, stage: str) -> InputRecord | None:
        found = [e for e in self.envelope.inputs.values() if e.stage == stage]
        return found[0] if len(found) == 1 else None


def read_raw(directory: Path, kind: str | None) -> dict[str, Any]:
    """The manifest dict: present, forge's schema, of stage `kind`. (manifest.read_manifest delegates here.)"""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise StageInputError(
            str(directory),
            f"no {MANIFEST_NAME}: the upstream stage{f' ({kind})' if kind else ''} has not run or did not finish.",
            "run `dvc repro` (or the upstream forge command) first.",
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageInputError(str(path), f"is not valid JSON ({exc}).", "re-run the stage that wrote it.") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        raise StageInputError(str(path), f"unknown manifest schema {schema!r}.", "re-run the stage.")
    if kind and manifest.get("stage") != kind:
        raise StageInputError(str(path), f"expected a {kind} manifest, found {manifest.get('stage')!r}.",
                              "pass the right directory.")
    return manifest


def open_upstream(directory: Path, kind: str, recipe: Any = None, sections: Iterable[str] = (), *,
                  verify: bool = True, rerun: str | None = None, any_recipe_id: bool = False) -> Opened[Any]:
    """Read, type-check and verify the `kind` output in `directory`; with `recipe`, also that it was
    made for that recipe from `sections` as they read now. `rerun` is the fix a mismatch names.
    `any_recipe_id`: the output may come from another recipe whose `sections` are the same (a
    calibration set serves every recipe with the same calibration section); the digests still count."""
    directory = Path(directory)
    where = str(directory / MANIFEST_NAME)
    raw = read_raw(directory, kind)
    envelope = check_envelope(raw, where)
    details = check_details(kind, envelope.details, where)
    if verify:
        verify_files(directory, raw)
    opened = Opened(directory, envelope, details, manifest_digest(directory))
    if recipe is not None:
        problem = recipe_mismatch(recipe, raw.get("recipe"), tuple(sections), check_id=not any_recipe_id)
        if problem:
            raise StageInputError(str(directory), f"{problem}.",
                                  rerun or f"re-run it for this recipe: dvc repro {kind}@{recipe.id}")
    return opened


def recipe_mismatch(recipe: Any, record: dict[str, Any] | None, sections: tuple[str, ...],
                    check_id: bool = True) -> str | None:
    """Why `record` (a manifest's `recipe`) is not `recipe` with `sections` as they read now; None if it is.
    One rule for every reader and the lineage walk: a missing id or section digest does not pass."""
    record = record or {}
    made_for = record.get("id")
    if check_id and made_for != recipe.id:
        return (f"was made for recipe {made_for!r}, not {recipe.id!r}" if made_for
                else f"records no recipe id, so it cannot be tied to {recipe.id!r}")
    recorded = record.get("sections") or {}
    missing = [s for s in sections if s not in recorded]
    if missing:
        return f"records no digest of recipe section(s) {', '.join(missing)}, so it cannot be tied to {recipe.path}"
    for section in sections:
        try:
            current = recipe.section_digest(section)
        except KeyError:
            return f"was made from section {section!r}, which {recipe.path} no longer has"
        if recorded[section] != current:
            return (f"was made from another `{section}` section of {recipe.path} "
                    f"(digest {recorded[section][:12]}…, now {current[:12]}…)")
    return None
