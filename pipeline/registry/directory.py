"""The directory registry: versioned, verifiable artifact bundles in a plain directory tree reached
through fsspec (pipeline/registry/fsstorage.py), so the same code serves a local path and s3://, gs://,
az://, ssh:// URLs.

An artifact is a bundle directory (quantized checkpoint, runtime config, stage manifests) plus a
metadata dict, published under a name `<model>-<format>-<gpu>` such as
`smollm2-135m-instruct-fp8-h200`.

Layout under the registry root::

    blobs/sha256/<first2>/<hexdigest>                  file contents, content-addressed, immutable
    artifacts/<name>/versions/<vX.Y.Z>.json            one manifest per version, written once
    artifacts/<name>/stages/<stage>/<seq:08d>.json     stage-label events, append-only
    artifacts/<name>/refusals/<key>.json               gate refusals of a name never published

A manifest holds the metadata and the file list (relpath, sha256, size). Nothing is ever
rewritten: there is no shared index file that racing writers could corrupt. `list_artifacts()`
derives the index by listing `artifacts/`, and a stage label is whichever event of that stage
has the highest sequence number.

Write order (so a reader never sees a manifest whose blobs are missing): blobs first, each
written to a temporary name and moved into place (pipeline/registry/blobs.py); the manifest last,
created *exclusively* (FsStorage.create_exclusive; its docstring says what each backend guarantees).
Versions are `vMAJOR.MINOR.PATCH`, the first `v1.0.0`, each publish bumps PATCH. Two publishers
racing for the same version cannot both win: the loser sees the file exists and retries with
the next version. On a backend that ignores exclusive create, two writers whose write and
read-back interleave exactly can still lose one manifest (its blobs stay; republishing restores it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core.errors import RegistryError, VerificationError
from pipeline.core.local_gpu import LocalGpu
from pipeline.registry.artifacts import (
    MANIFEST_SCHEMA,
    MAX_PUBLISH_ATTEMPTS,
    NAME_PATTERN,
    PULL_WRITES,
    VERSION_PATTERN,
    ArtifactSummary,
    PublishResult,
    PullResult,
    StageAssignment,
    VersionResolver,
    bundle_files,
    canonical,
    format_version,
    next_version,
    parse_version,
    place_verified,
    same_content,
    strip_timestamps,
    summarize,
    validate_metadata,
    validate_name,
)
from pipeline.registry.blobs import BlobStore
from pipeline.registry.fsstorage import FsStorage
from pipeline.registry.selection import check_compatible, sizing_caveats
from pipeline.registry.transfer import check_entries

log = logging.getLogger(__name__)


class Registry(VersionResolver):
    """A registry rooted at `url` (a local directory or any fsspec URL). Creates nothing until written to."""

    def __init__(self, url: str | os.PathLike):
        self.storage = FsStorage(url)
        self.url = self.storage.url
        self.blobs = BlobStore(self.storage)
        self.problems: list[str] = []  # unreadable manifests skipped by manifests() / list_artifacts()

    def _manifest_path(self, name: str, version: str) -> str:
        return self.storage.path("artifacts", name, "versions", f"{version}.json")

    def _read_manifest(self, name: str, version: str) -> dict:
        """A version's manifest, checked: it names itself, and its file list is safe to fetch."""
        path = self._manifest_path(name, version)
        manifest = self.storage.read_json_object(path)
        where = self.storage.url_of(path)
        for key, expected in (("name", name), ("version", version)):
            if manifest.get(key) != expected:
                raise VerificationError(where, f"its `{key}` field is {manifest.get(key)!r}, not {expected!r} as "
                                               "its file name says.", "restore this file from a copy of the registry.")
        if not isinstance(manifest.get("metadata"), dict):
            raise VerificationError(where, "has no `metadata` mapping.", "restore this file from a copy of the registry.")
        check_entries(manifest.get("files"), where, reserved=PULL_WRITES)
        return manifest

    # ---- reading

    def require_root(self) -> None:
        self.storage.require_root()

    def names(self) -> list[str]:
        """Every artifact name with at least one version."""
        return [
            n
            for n in self.storage.ls_names(self.storage.path("artifacts"))
            if re.fullmatch(NAME_PATTERN, n) and self.version_numbers(n)
        ]

    def version_numbers(self, name: str) -> list[tuple[int, int, int]]:
        """Versions of `name` as numbers, oldest first."""
        found = []
        for entry in self.storage.ls_names(self.storage.path("artifacts", name, "versions")):
            stem, ext = posixpath.splitext(entry)
            if ext == ".json" and re.fullmatch(VERSION_PATTERN, stem):
                found.append(parse_version(stem))
        return sorted(found)

    def versions(self, name: str) -> list[str]:
        """Versions of `name`, oldest first (semantic order, not string order)."""
        validate_name(name)
        return [format_version(v) for v in self.version_numbers(name)]

    def stages(self, name: str) -> dict[str, str]:
        """Current stage labels of `name`: stage -> version (the newest event of each stage wins)."""
        validate_name(name)
        current = {}
        for stage in self.storage.ls_names(self.storage.path("artifacts", name, "stages")):
            events = [
                e
                for e in self.storage.ls_names(self.storage.path("artifacts", name, "stages", stage))
                if re.fullmatch(r"[0-9]{8}\.json", e)
            ]
            if events:
                path = self.storage.path("artifacts", name, "stages", stage, events[-1])
                version = self.storage.read_json_object(path).get("version")
                if not isinstance(version, str) or not re.fullmatch(VERSION_PATTERN, version):
                    raise VerificationError(self.storage.url_of(path), f"names no valid version ({str(version)[:80]!r}).",
                                            "re-assign the stage (`forge publish ... --stage`).")
                current[stage] = version
        return current

    def get_manifest(self, name: str, version: str | None = None, stage: str | None = None) -> dict:
        """The manifest of the given version, the version a stage points at, or the newest."""
        return self._read_manifest(name, self.resolve(name, version=version, stage=stage))

    def _healthy(self, name: str, version: str) -> dict | None:
        """The manifest, or None after recording why it is unreadable (one bad file spoils no listing)."""
        try:
            return self._read_manifest(name, version)
        except VerificationError as exc:
            self.problems.append(str(exc))
            log.warning("skipping %s %s: %s", name, version, exc)
            return None

    def manifests(self, model: str | None = None) -> list[dict]:
        """Every readable version's manifest (select_for_gpu input), optionally only metadata.model == `model`.
        Unreadable ones are skipped and named in `self.problems`."""
        self.require_root()
        out = []
        for name in self.names():
            for version in self.versions(name):
                manifest = self._healthy(name, version)
                if manifest is not None and (model is None or manifest["metadata"].get("model") == model):
                    out.append(manifest)
        return out

    def list_artifacts(self, gpu: str | None = None) -> list[ArtifactSummary]:
        """One summary per artifact (its newest readable version), sorted by name; `gpu` keeps only
        artifacts built for that catalog SKU. Unreadable manifests are named in `self.problems`."""
        self.storage.require_root()
        summaries = []
        for name in self.names():
            versions = tuple(self.versions(name))
            manifest = next((m for v in reversed(versions) if (m := self._healthy(name, v)) is not None), None)
            if manifest is None:
                continue
            meta = manifest["metadata"]
            if gpu is not None and meta.get("gpu") != gpu:
                continue
            summaries.append(summarize(name, versions, self.stages(name), meta))
        return summaries

    def refusals(self) -> list[dict]:
        """Gate refusals recorded by `record_refusal`, for artifacts that have no published version."""
        published = set(self.names())
        out = []
        for name in self.storage.ls_names(self.storage.path("artifacts")):
            if name in published or not re.fullmatch(NAME_PATTERN, name):
                continue
            entries = self.storage.ls_names(self.storage.path("artifacts", name, "refusals"))
            if entries:
                try:
                    out.append(self.storage.read_json_object(self.storage.path("artifacts", name, "refusals", entries[-1])))
                except VerificationError as exc:
                    self.problems.append(str(exc))
        return out

    # ---- writing

    def publish(
        self,
        bundle_dir: str | os.PathLike,
        name: str,
        metadata: Mapping[str, Any],
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> PublishResult:
        """Publish `bundle_dir` as the next version of `name`; created=False if the newest is identical."""
        validate_name(name)
        validate_metadata(metadata)
        bundle = Path(bundle_dir)
        files = bundle_files(bundle)
        meta = json.loads(canonical(metadata))  # a plain-JSON copy: the caller's dict is never kept
        with self.storage.writable():
            self.blobs.collect_garbage()
            uploaded = sum(self.blobs.upload(bundle / f["relpath"], f["sha256"], f["size"]) for f in files)
            log.info("%s: %d files, %d new blobs", name, len(files), uploaded)
            for _ in range(MAX_PUBLISH_ATTEMPTS):
                existing = self.version_numbers(name)
                if existing:
                    newest = format_version(existing[-1])
                    if same_content(self.storage.read_json_object(self._manifest_path(name, newest)), files, meta):
                        log.info("%s %s already has this content; nothing published", name, newest)
                        return PublishResult(name, newest, self.storage.url_of(self._manifest_path(name, newest)), created=False)
                version = format_version(next_version(existing))
                manifest = {
                    "schema": MANIFEST_SCHEMA,
                    "name": name,
                    "version": version,
                    "published_at": now().isoformat(timespec="seconds"),
                    "metadata": meta,
                    "files": files,
                    "total_bytes": sum(f["size"] for f in files),
                }
                path = self._manifest_path(name, version)
                try:
                    self.storage.create_exclusive(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
                except FileExistsError:
                    log.info("%s %s was taken by another publisher; trying the next version", name, version)
                    continue
                log.info("published %s %s", name, version)
                return PublishResult(name, version, self.storage.url_of(path), created=True)
        raise RegistryError(
            f"artifact {name}",
            f"lost the race for a new version {MAX_PUBLISH_ATTEMPTS} times.",
            "check that the registry backend supports exclusive create, then publish again.",
        )

    def record_refusal(self, name: str, metadata: Mapping[str, Any], reason: str) -> None:
        """Note that `name` was built but refused by its gate, so `forge list --gpu` can say so (no blobs)."""
        validate_name(name)
        record = {"name": name, "reason": reason, "metadata": json.loads(canonical(metadata))}
        body = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        key = hashlib.sha256(canonical(strip_timestamps(record)).encode()).hexdigest()[:16]
        with self.storage.writable():
            try:
                self.storage.create_exclusive(self.storage.path("artifacts", name, "refusals", f"{key}.json"), body)
            except FileExistsError:
                pass  # the same refusal, recorded by an earlier run

    def assign_stage(self, name: str, version: str, stage: str) -> StageAssignment:
        """Label `version` of `name` with `stage` by appending an event (earlier labels stay as history)."""
        validate_name(stage, kind="stage name")
        resolved = self.resolve(name, version=version)
        folder = self.storage.path("artifacts", name, "stages", stage)
        with self.storage.writable():
            for _ in range(MAX_PUBLISH_ATTEMPTS):
                seqs = [int(e[:8]) for e in self.storage.ls_names(folder) if re.fullmatch(r"[0-9]{8}\.json", e)]
                seq = max(seqs, default=0) + 1
                event = {
                    "name": name,
                    "stage": stage,
                    "version": resolved,
                    "seq": seq,
                    "assigned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                try:
                    self.storage.create_exclusive(
                        posixpath.join(folder, f"{seq:08d}.json"),
                        (json.dumps(event, sort_keys=True) + "\n").encode(),
                    )
                except FileExistsError:
                    continue
                return StageAssignment(name, stage, resolved, seq)
        raise RegistryError(f"artifact {name}", f"could not append a {stage!r} event.", "try again.")

    # ---- pulling

    def pull(
        self,
        name: str,
        dest: str | os.PathLike,
        *,
        version: str | None = None,
        stage: str | None = None,
        force: bool = False,
        local_gpu: LocalGpu | None = None,
        runtime_versions: Mapping[str, str | None] | None = None,
        progress: bool = False,
    ) -> PullResult:
        """Download, verify and place an artifact at `dest` (all or nothing), with `forge-artifact.json`."""
        manifest = self.get_manifest(name, version=version, stage=stage)
        resolved = manifest["version"]
        where = f"{name} {resolved}"
        problems = check_compatible(manifest, where, local_gpu, runtime_versions, force)
        return place_verified(name, manifest, dest, problems, progress, self.blobs.fetch_verified,
                              sizing_caveats(manifest, local_gpu))
