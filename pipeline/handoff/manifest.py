"""What every stage leaves beside its outputs, and how the next stage checks it.

A stage's output directory holds `manifest.json`:
    schema      "forge.manifest/2"
    stage       download | calibrate | build | evaluate | ...
    subject     what it is about (model name, recipe id, target)
    recipe      {id, path, digest} when a recipe drove it
    inputs      {name: {path, stage, manifest_sha256}}: the upstream manifests, digest by digest
    files       {relpath: {sha256, size}} of everything the stage wrote (manifest excluded)
    tools       {package: version}
    details     stage-specific facts (plans, metrics summaries, ...)
No wall-clock byte: the manifest is part of the stage's DVC output, and DVC's run-cache, `dvc status`
and a shared remote work on output digests, so two runs of the same inputs must write the same bytes.
What a run cost (seconds per phase, peak memory) goes to its timings metrics file instead
(pipeline/handoff/kpis.py write_timings; dvc.yaml's top-level `metrics:`).
Chaining upstream *manifest* digests (which themselves list file digests) lets publish verify the
whole lineage recipe -> calibration set -> downloaded model without rehashing gigabytes twice.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageInputError
from pipeline.core.files import file_digests, sha256_file, write_json
from pipeline.core.layout import MANIFEST_NAME
from pipeline.handoff.models import PREVIOUS_SCHEMAS, SCHEMA, check_details

DEFAULT_TOOLS = ("forge", "torch", "transformers", "nvidia-modelopt", "lm-eval", "dvc", "tensorrt-llm")


def tool_versions(names: tuple[str, ...] = DEFAULT_TOOLS) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_manifest(directory: Path, stage: str | None = None) -> dict[str, Any]:
    """The raw manifest dict: present, forge's schema, of kind `stage` when given. Stages read upstream
    outputs through pipeline.handoff.reader.open_upstream, which also type-checks and verifies them."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise StageInputError(
            str(directory),
            f"no {MANIFEST_NAME}: the upstream stage{f' ({stage})' if stage else ''} has not run or did not finish.",
            "run `dvc repro` (or the upstream forge command) first.",
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageInputError(str(path), f"is not valid JSON ({exc}).", "re-run the stage that wrote it.") from None
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema in PREVIOUS_SCHEMAS:
        raise StageInputError(
            f"{path}: schema",
            f"is {schema!r}, written by an older forge whose manifests held wall-clock fields (`created`, "
            f"`timings`) that changed the output's digest on every run; this forge reads {SCHEMA!r}.",
            f"re-run the {manifest.get('stage') or stage or 'upstream'} stage with this forge: `dvc repro` re-runs it "
            "(every stage in dvc.yaml depends on pipeline/handoff/manifest.py); for an output that came from "
            "elsewhere (a DVC remote, a copy), `dvc repro --force <stage>`.")
    if schema != SCHEMA:
        raise StageInputError(str(path), f"unknown manifest schema {schema!r} (this forge reads {SCHEMA!r}).",
                              "re-run the stage.")
    if stage and manifest.get("stage") != stage:
        raise StageInputError(str(path), f"expected a {stage} manifest, found {manifest.get('stage')!r}.",
                              "pass the right directory.")
    return manifest


def manifest_digest(directory: Path) -> str:
    return sha256_file(Path(directory) / MANIFEST_NAME)


def verify_files(directory: Path, manifest: dict[str, Any] | None = None) -> None:
    """Every file the manifest lists is present with its digest; nothing unlisted was added."""
    manifest = manifest or read_manifest(directory)
    actual = file_digests(directory)
    listed = manifest["files"]
    for rel, entry in listed.items():
        if rel not in actual:
            raise StageInputError(f"{directory}/{rel}", "listed in the manifest but missing.", "re-run the stage.")
        if actual[rel]["sha256"] != entry["sha256"]:
            raise StageInputError(
                f"{directory}/{rel}",
                f"sha256 {actual[rel]['sha256'][:12]}… does not match the manifest's {entry['sha256'][:12]}….",
                "the output was modified after its stage ran; re-run the stage (dvc repro).",
            )
    extra = sorted(set(actual) - set(listed))
    if extra:
        raise StageInputError(str(directory), f"files not in the manifest: {', '.join(extra[:5])}.", "re-run the stage.")


def input_record(directory: Path, stage: str, digest: str, subject: str | None) -> dict[str, Any]:
    """How a consumer records an upstream output among its `inputs` (models.InputRecord)."""
    return {"path": str(directory), "stage": stage, "manifest_sha256": digest, "subject": subject}


def input_entry(directory: Path, stage: str) -> dict[str, Any]:
    """The `inputs` record of the `stage` output in `directory`, read from its manifest."""
    manifest = read_manifest(directory, stage)
    return input_record(directory, stage, manifest_digest(directory), manifest.get("subject"))


def build_manifest(
    stage: str,
    subject: str,
    output_dir: Path,
    inputs: dict[str, dict[str, Any]],
    *,
    details: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest for `output_dir`; `details` must match the stage's handoff model (pipeline/handoff/models.py),
    checked in its JSON form, so the writer fails on a field no reader knows. Keyword-only after
    `inputs`: /1 took `timings` in the fifth place, and a caller still passing them fails here, loudly."""
    check_details(stage, json.loads(json.dumps(details or {}, default=str)), f"{output_dir}/{MANIFEST_NAME} ({stage})")
    return {
        "schema": SCHEMA,
        "stage": stage,
        "subject": subject,
        "recipe": recipe,
        "inputs": inputs,
        "files": file_digests(output_dir),
        "tools": tool_versions(),
        "details": details or {},
    }


def write_manifest(output_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(output_dir) / MANIFEST_NAME
    write_json(path, manifest)
    return path
