"""What every registry kind shares about an artifact: the name rule, versions, the metadata a
publish must carry (and how two publishes are compared), the result records, the bundle's file
list, the common pull (`place_verified`), version lookup (`VersionResolver`) and listing
(`ManifestListing`). The kinds themselves: pipeline/registry/directory.py (directory / fsspec), oci.py,
plain.py; which artifact suits a GPU: pipeline/registry/selection.py; git tags: pipeline/registry/tags.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import RegistryError, VerificationError
from pipeline.core.files import CHUNK
from pipeline.registry.transfer import (
    SUMS_FILE,
    ByteProgress,
    collect_partials,
    holds_verified,
    sha256sums,
    staged_pull,
)

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,127}$"
NAME_RULE = "lower-case letters, digits, '_' and '-' only, starting with a letter or digit, at most 128 characters"
VERSION_PATTERN = r"^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$"
FIRST_VERSION = (1, 0, 0)
MANIFEST_SCHEMA = "forge-artifact/1"
MANIFEST_FILENAME = "forge-artifact.json"
PULL_WRITES = (MANIFEST_FILENAME, SUMS_FILE)  # files pull adds beside the artifact's own
PASSING_VERDICT = "pass"
# What a registry can hold: PASS, and INCONCLUSIVE where the recipe's eval.gates.inconclusive said
# publish (pipeline/recipe/eval_schema.py GATE_RULE); FAIL never publishes.
PUBLISHED_VERDICTS = (PASSING_VERDICT, "inconclusive")
MAX_PUBLISH_ATTEMPTS = 1000  # versions a publisher tries before it gives up racing the others

_EXAMPLE_NAME = "smollm2-135m-instruct-fp8-h200"

# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PublishResult:
    name: str
    version: str
    manifest_url: str
    created: bool


@dataclass(frozen=True)
class StageAssignment:
    name: str
    stage: str
    version: str
    seq: int


@dataclass(frozen=True)
class ArtifactSummary:
    """One row of `forge list`: facts from the newest version, plus every version and stage."""

    name: str
    versions: tuple[str, ...]
    stages: dict[str, str]
    latest: str
    model: str
    format: str
    gpu: str
    compute_capability: str
    bits_per_weight: float
    gate_verdict: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PullResult:
    name: str
    version: str
    dest: Path
    files: int
    total_bytes: int
    overridden: tuple[str, ...]  # compatibility problems accepted because force=True
    caveats: tuple[str, ...] = ()  # compatible, but worth knowing (selection.sizing_caveats)
    already_present: bool = False  # `dest` held this version, verified file by file: nothing fetched


# --------------------------------------------------------------------------- names and versions


def _suggest_name(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-_")
    return slug[:128]


def validate_name(name: str, kind: str = "artifact name") -> str:
    """Return `name` if it matches NAME_PATTERN, else raise RegistryError with a suggested fix.

    Names become path components and git tag parts (GTO forbids dots), so anything that could
    escape a directory ('/', '..') or be read as a version ('.') is refused, as is upper case
    (case-insensitive filesystems would merge two artifacts).
    """
    if isinstance(name, str) and re.fullmatch(NAME_PATTERN, name):
        return name
    suggestion = _suggest_name(name) if isinstance(name, str) else ""
    fix = f"use {suggestion!r}." if suggestion else f"use a name like {_EXAMPLE_NAME!r}."
    raise RegistryError(f"{kind} {name!r}", f"must match {NAME_PATTERN} ({NAME_RULE}).", fix)


def artifact_name(model: str, format: str, gpu: str) -> str:
    """The conventional artifact name `<model>-<format>-<gpu>`, validated."""
    return validate_name(f"{model}-{format}-{gpu}")


def parse_version(version: str) -> tuple[int, int, int]:
    match = re.fullmatch(VERSION_PATTERN, version) if isinstance(version, str) else None
    if not match:
        raise RegistryError(
            f"version {version!r}", "is not a version of the form vMAJOR.MINOR.PATCH.", "write e.g. 'v1.0.0' (or '1.0.0')."
        )
    return int(match[1]), int(match[2]), int(match[3])


def normalize_version(version: str) -> str:
    """A version as the registry spells it: "1.0.0" and "v1.0.0" both name v1.0.0 (people drop the v)."""
    text = version.strip() if isinstance(version, str) else version
    if isinstance(text, str) and re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", text):
        text = f"v{text}"
    return format_version(parse_version(text))


def format_version(numbers: tuple[int, int, int]) -> str:
    return "v{}.{}.{}".format(*numbers)


def next_version(existing: Iterable[tuple[int, int, int]]) -> tuple[int, int, int]:
    newest = max(existing, default=None)
    if newest is None:
        return FIRST_VERSION
    return newest[0], newest[1], newest[2] + 1


# --------------------------------------------------------------------------- metadata


def validate_metadata(metadata: Mapping[str, Any]) -> None:
    """Check the metadata fields the registry relies on; report every problem at once.

    Required: model, format, gpu (strings); compute_capability ("9.0"); bits_per_weight (number);
    tp (int >= 1); runtime_versions ({package: version}); gate ({"verdict": "pass"|..., ...}).
    Optional and used when present: accuracy / throughput (nested dicts of numbers, shown by
    list), memory_plan, min_gpu_memory_bytes (int, checked by GPU selection).
    """
    problems = []
    for key in ("model", "format", "gpu"):
        if not isinstance(metadata.get(key), str) or not metadata.get(key):
            problems.append(f"{key} must be a non-empty string")
    cc = metadata.get("compute_capability")
    if not isinstance(cc, str) or not re.fullmatch(r"[0-9]+\.[0-9]+", cc):
        problems.append(f"compute_capability must be a string like '9.0', got {cc!r}")
    bpw = metadata.get("bits_per_weight")
    if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or bpw <= 0:
        problems.append(f"bits_per_weight must be a positive number, got {bpw!r}")
    tp = metadata.get("tp")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        problems.append(f"tp must be an integer >= 1, got {tp!r}")
    runtimes = metadata.get("runtime_versions")
    if not isinstance(runtimes, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in runtimes.items()
    ):
        problems.append(f"runtime_versions must map package names to version strings, got {runtimes!r}")
    gate = metadata.get("gate")
    if not isinstance(gate, Mapping) or not isinstance(gate.get("verdict"), str):
        problems.append(f"gate must be a mapping with a string 'verdict', got {gate!r}")
    mem = metadata.get("min_gpu_memory_bytes")
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int) or mem < 0):
        problems.append(f"min_gpu_memory_bytes must be a non-negative integer, got {mem!r}")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        problems.append(f"must be JSON-serialisable ({exc})")
    if problems:
        raise RegistryError(
            "publish metadata",
            "; ".join(problems) + ".",
            "have the publish stage fill these fields from the build and evaluate manifests.",
        )


def strip_timestamps(value: Any) -> Any:
    # Idempotence compares content, not when it was produced: keys named "timestamp" or ending
    # in "_at" (created_at, evaluated_at...) are ignored at any depth.
    if isinstance(value, Mapping):
        return {
            k: strip_timestamps(v)
            for k, v in value.items()
            if not (k == "timestamp" or (isinstance(k, str) and k.endswith("_at")))
        }
    if isinstance(value, (list, tuple)):
        return [strip_timestamps(v) for v in value]
    return value


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def same_content(manifest: Mapping[str, Any], files: list[dict], metadata: Mapping[str, Any]) -> bool:
    theirs = [(f["relpath"], f["sha256"], f["size"]) for f in manifest.get("files", [])]
    ours = [(f["relpath"], f["sha256"], f["size"]) for f in files]
    if sorted(theirs) != sorted(ours):
        return False
    return canonical(strip_timestamps(manifest.get("metadata", {}))) == canonical(
        strip_timestamps(json.loads(canonical(metadata)))
    )


def _flat_numbers(value: Any, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(value, Mapping):
        for key, sub in value.items():
            out.update(_flat_numbers(sub, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


# --------------------------------------------------------------------------- bundle hashing


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def bundle_files(bundle_dir: Path) -> list[dict]:
    if not bundle_dir.is_dir():
        raise RegistryError(
            f"bundle {bundle_dir}", "is not a directory.", "pass the build stage's bundle output directory."
        )
    files = []
    for root, dirs, names in os.walk(bundle_dir):
        dirs.sort()
        for fname in sorted(names):
            path = Path(root) / fname
            relpath = path.relative_to(bundle_dir).as_posix()
            if relpath in PULL_WRITES:
                # A pulled bundle carries its registry manifest; republishing it must not nest it.
                log.info("skipping %s in %s: it is written by pull, not part of the artifact", relpath, bundle_dir)
                continue
            if not path.is_file():
                continue
            sha, size = _hash_file(path)
            files.append({"relpath": relpath, "sha256": sha, "size": size})
    files.sort(key=lambda f: f["relpath"])
    if not files:
        raise RegistryError(f"bundle {bundle_dir}", "contains no files.", "publish the build stage's output directory.")
    return files


# --------------------------------------------------------------------------- the registry


def place_verified(name: str, manifest: Mapping[str, Any], dest: str | os.PathLike, problems: Sequence[str],
                   progress: bool, fetch: Callable[[Mapping[str, Any], Path, str, ByteProgress], None],
                   caveats: Sequence[str] = ()) -> PullResult:
    """Every registry kind's pull, after it has resolved and checked the manifest: `fetch(entry,
    staging, where, bar)` writes one file and verifies its digest; then `forge-artifact.json` and
    `SHA256SUMS` (so `sha256sum -c SHA256SUMS` verifies the folder) are added, and `dest` appears
    all at once or not at all (staged_pull). A `dest` that already holds this version, every file
    verified, is left as it is (holds_verified): pulling again is a no-op, not an error."""
    where = f"{name} {manifest['version']}"
    total = sum(f["size"] for f in manifest["files"])
    target = Path(dest).absolute()
    if holds_verified(target, where, manifest, MANIFEST_FILENAME):
        collect_partials(target)
        log.info("%s is already in %s, every file verified; nothing fetched", where, target)
        return PullResult(name, manifest["version"], target, len(manifest["files"]), total, tuple(problems),
                          tuple(caveats), already_present=True)
    with staged_pull(dest) as staging, ByteProgress(total, where, progress) as bar:
        for entry in manifest["files"]:
            fetch(entry, staging, where, bar)
        (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (staging / SUMS_FILE).write_text(sha256sums(manifest["files"]))
    log.info("pulled %s into %s", where, target)
    return PullResult(name, manifest["version"], target, len(manifest["files"]), total, tuple(problems),
                      tuple(caveats))


class VersionResolver:
    """`resolve` for a registry kind that offers `names`, `versions`, `stages` and `require_root` (the
    directory and plain kinds; the OCI kind words its own errors)."""

    url: str

    def resolve(self, name: str, version: str | None = None, stage: str | None = None) -> str:
        """The version that `version` / `stage` / (neither: newest) designates."""
        validate_name(name)
        if version is not None and stage is not None:
            raise RegistryError(f"artifact {name}", "both a version and a stage were given.", "give one of them.")
        version = None if version is None else normalize_version(version)
        existing = self.versions(name)
        if not existing:
            self.require_root()
            raise self.unknown_name(name)
        if stage is not None:
            labels = self.stages(name)
            if stage not in labels:
                listing = ", ".join(f"{s} -> {v}" for s, v in sorted(labels.items())) or "none"
                raise RegistryError(
                    f"artifact {name}",
                    f"has no stage {stage!r}; its stages are: {listing}.",
                    f"assign it first, or pull a version ({', '.join(existing)}).",
                )
            if labels[stage] not in existing:
                raise RegistryError(f"artifact {name}", f"stage {stage!r} points at {labels[stage]}, which is not in "
                                                        f"the registry (versions: {', '.join(existing)}).",
                                    "re-assign the stage to a version that exists, or pull a version.")
            return labels[stage]
        if version is None:
            return existing[-1]
        if version not in existing:
            raise RegistryError(
                f"artifact {name}",
                f"has no version {version!r}; it has: {', '.join(existing)}.",
                "pick one of those versions, or omit the version for the newest.",
            )
        return version

    def unknown_name(self, name: str) -> RegistryError:
        known = self.names()
        return RegistryError(
            f"registry {self.url}",
            f"has no artifact {name!r}; it has: {', '.join(known) if known else 'none'}.",
            "run `forge list` and pick one of those names.",
        )


class ManifestListing:
    """`manifests` and `list_artifacts` for a registry kind that reads one manifest per version
    (`get_manifest`) and names the unreadable ones in `self.problems` (the OCI and plain kinds;
    the directory kind also skips to an older readable version, so it keeps its own)."""

    problems: list[str]

    def manifests(self, model: str | None = None) -> list[dict]:
        out = []
        for name in self.names():
            for version in self.versions(name):
                try:
                    manifest = self.get_manifest(name, version)
                except VerificationError as exc:
                    self.problems.append(str(exc))
                    continue
                if model is None or manifest["metadata"].get("model") == model:
                    out.append(manifest)
        return out

    def list_artifacts(self, gpu: str | None = None) -> list[ArtifactSummary]:
        summaries = []
        for name in self.names():
            versions = tuple(self.versions(name))
            try:
                meta = self.get_manifest(name, versions[-1])["metadata"]
            except VerificationError as exc:
                self.problems.append(str(exc))
                continue
            if gpu is None or meta.get("gpu") == gpu:
                summaries.append(summarize(name, versions, self.stages(name), meta))
        return summaries


def summarize(name: str, versions: tuple[str, ...], stages: dict[str, str], meta: Mapping[str, Any]) -> ArtifactSummary:
    """One `forge list` row from the newest version's metadata (every registry kind shares it)."""
    metrics = {**_flat_numbers(meta.get("accuracy"), "accuracy"), **_flat_numbers(meta.get("throughput"), "throughput")}
    return ArtifactSummary(
        name=name, versions=versions, stages=stages, latest=versions[-1], model=meta.get("model", ""),
        format=meta.get("format", ""), gpu=meta.get("gpu", ""), compute_capability=meta.get("compute_capability", ""),
        bits_per_weight=float(meta.get("bits_per_weight", 0.0) or 0.0),
        gate_verdict=(meta.get("gate") or {}).get("verdict", ""), metrics=metrics)
