"""Publish and pull versioned, verifiable artifact bundles; pick the right one for a local GPU.

An artifact is a bundle directory (quantized checkpoint, runtime config, stage manifests) plus a
metadata dict, published under a name `<model>-<format>-<gpu>` such as
`smollm2-135m-instruct-fp8-h200`. The registry is a plain directory tree, reached through fsspec,
so the same code serves a local path and s3://, gs://, az://, ssh:// URLs.

Layout under the registry root::

    blobs/sha256/<first2>/<hexdigest>                  file contents, content-addressed, immutable
    artifacts/<name>/versions/<vX.Y.Z>.json            one manifest per version, written once
    artifacts/<name>/stages/<stage>/<seq:08d>.json     stage-label events, append-only

A manifest holds the metadata and the file list (relpath, sha256, size). Nothing is ever
rewritten: there is no shared index file that racing writers could corrupt. `list_artifacts()`
derives the index by listing `artifacts/`, and a stage label is whichever event of that stage
has the highest sequence number.

Write order (so a reader never sees a manifest whose blobs are missing): blobs first, each
written to a temporary name and moved into place; the manifest last, created *exclusively*.
Versions are `vMAJOR.MINOR.PATCH`, the first `v1.0.0`, each publish bumps PATCH. Two publishers
racing for the same version cannot both win: the loser sees the file exists and retries with
the next version.

Exclusive create, per backend:
  * local directories: the manifest is written to a temporary file in the same directory and
    hard-linked to its final name; link(2) fails with EEXIST if the name exists, so the final
    name appears atomically, complete, at most once. Filesystems without hard links fall back
    to open(O_CREAT | O_EXCL) (still exclusive, but a reader may briefly see a partial file).
  * other fsspec backends: `fs.open(path, "xb")`. s3fs sends `If-None-Match: *` (s3fs PR #917,
    fixed for small files in #974; needs botocore >= 1.33), adlfs maps it to overwrite=False
    (adlfs PR #491), gcsfs to ifGenerationMatch=0. **Limitation**: fsspec leaves "x" to the
    backend ("may be implemented by the backend", fsspec spec.py `open`); a backend that ignores
    it writes like "wb". To narrow that window the registry checks existence first and reads
    the manifest back after writing; a writer that finds someone else's bytes retries with the
    next version. Two writers whose write and read-back interleave exactly can still lose one
    manifest on such a backend (its blobs stay; republishing restores it). Backends with
    listing caches (s3fs) have them invalidated before every version listing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# The shared artifact vocabulary and the selection rule live in pipeline/artifacts.py and
# pipeline/selection.py; their names stay importable from here (registry_oci, registry_plain, callers).
from pipeline.artifacts import (  # noqa: F401
    _EXAMPLE_NAME,
    CHUNK,
    FIRST_VERSION,
    MANIFEST_FILENAME,
    MANIFEST_SCHEMA,
    NAME_PATTERN,
    NAME_RULE,
    PASSING_VERDICT,
    PULL_WRITES,
    VERSION_PATTERN,
    ArtifactSummary,
    ManifestListing,
    PublishResult,
    PullResult,
    StageAssignment,
    _bundle_files,
    _canonical,
    _flat_numbers,
    _hash_file,
    _next_version,
    _same_content,
    _strip_timestamps,
    _suggest_name,
    artifact_name,
    format_version,
    parse_version,
    place_verified,
    summarize,
    validate_metadata,
    validate_name,
)
from pipeline.errors import RegistryError, VerificationError
from pipeline.gpu_detect import LocalGpu
from pipeline.pulling import (
    SHA256_HEX,
    ByteProgress,
    check_entries,
    copy_verified,
    file_chunks,
)
from pipeline.selection import check_compatible, compatibility_problems, reject_reason, select_for_gpu  # noqa: F401

log = logging.getLogger(__name__)

MAX_PUBLISH_ATTEMPTS = 1000
# fsspec protocols whose implementation lives in an optional package, and the extra that brings it.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# A `*.tmp-<uuid>` blob older than this whose writer cannot be asked (remote stores: no flock) is a
# killed publish's leftover; local ones are told apart by their writer's flock instead.
STALE_TMP_SECONDS = 24 * 3600
MIN_LEFTOVER_AGE_SECONDS = 60  # with the lock free: no live writer touched it for a minute



class Registry:
    """A registry rooted at `url` (a local directory or any fsspec URL). Creates nothing until written to."""

    def __init__(self, url: str | os.PathLike):
        self.url = os.fspath(url)
        self.fs, self.root = _open_fs(self.url)
        self.root = self.root.rstrip("/") or "/"
        self._local = isinstance(self.fs, LocalFileSystem)
        if self._local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise RegistryError(f"registry {self.url}", "is a file, not a directory.",
                                "pass a registry directory (or a new path, created on first publish).")
        self.problems: list[str] = []  # unreadable manifests skipped by manifests() / list_artifacts()

    # ---- paths

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _blob_path(self, sha: str) -> str:
        if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):  # a digest becomes a path: hex only
            raise VerificationError(f"registry {self.url}", f"sha256 {str(sha)[:80]!r} is not 64 hex digits.",
                                    "the manifest is corrupt or was tampered with; re-publish the artifact.")
        return self._path("blobs", "sha256", sha[:2], sha)

    def _manifest_path(self, name: str, version: str) -> str:
        return self._path("artifacts", name, "versions", f"{version}.json")

    def _url(self, path: str) -> str:
        return path if self._local else self.fs.unstrip_protocol(path)

    # ---- low-level io

    def _ls_names(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def _read_json(self, path: str) -> dict:
        with self.fs.open(path, "rb") as fh:
            raw = fh.read()
        try:
            value = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VerificationError(
                self._url(path),
                f"is not valid JSON ({exc}).",
                "restore this file from a copy of the registry; registry files are never rewritten.",
            ) from exc
        if not isinstance(value, dict):
            raise VerificationError(self._url(path), f"holds a JSON {type(value).__name__}, not an object.",
                                    "restore this file from a copy of the registry.")
        return value

    def _read_manifest(self, name: str, version: str) -> dict:
        """A version's manifest, checked: it names itself, and its file list is safe to fetch."""
        path = self._manifest_path(name, version)
        manifest = self._read_json(path)
        where = self._url(path)
        for key, expected in (("name", name), ("version", version)):
            if manifest.get(key) != expected:
                raise VerificationError(where, f"its `{key}` field is {manifest.get(key)!r}, not {expected!r} as "
                                               "its file name says.", "restore this file from a copy of the registry.")
        if not isinstance(manifest.get("metadata"), dict):
            raise VerificationError(where, "has no `metadata` mapping.", "restore this file from a copy of the registry.")
        check_entries(manifest.get("files"), where, reserved=PULL_WRITES)
        return manifest

    def _create_exclusive(self, path: str, data: bytes) -> None:
        """Create `path` holding `data`; FileExistsError if it exists (see module docstring)."""
        parent = posixpath.dirname(path)
        self.fs.makedirs(parent, exist_ok=True)
        if self._local:
            self._create_exclusive_local(path, data)
            return
        if self.fs.exists(path):
            raise FileExistsError(path)
        with self.fs.open(path, "xb") as fh:
            fh.write(data)
        self.fs.invalidate_cache(path)
        if self.fs.cat_file(path) != data:
            raise FileExistsError(path)

    @staticmethod
    def _create_exclusive_local(path: str, data: bytes) -> None:
        parent = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; registry files are read by other users
            try:
                os.link(tmp, path)  # atomic; EEXIST if another writer took the name
                return
            except FileExistsError:
                raise
            except OSError as exc:
                log.debug("hard links unsupported in %s (%s); using O_EXCL", parent, exc)
            fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd2, "wb") as fh:
                fh.write(data)
        finally:
            os.unlink(tmp)

    def _upload_blob(self, source: Path, sha: str, size: int) -> bool:
        """Copy `source` into the blob store unless an intact copy is there; True if it uploaded.

        An existing blob is re-hashed before it is trusted: a same-size corruption would otherwise
        survive every re-publish (the repair that pull's error message advises)."""
        final = self._blob_path(sha)
        self.fs.invalidate_cache(posixpath.dirname(final))
        if self.fs.exists(final):
            if self._blob_digest(final) == (sha, size):
                return False
            log.warning("blob %s in the registry is corrupt (digest or size differ); replacing it", sha)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as src, self._open_tmp(tmp) as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != sha:
                raise RegistryError(
                    f"bundle file {source}",
                    "changed while it was being published.",
                    "let the stage that writes it finish, then publish again.",
                )
            if self._local:
                os.chmod(tmp, 0o644 & ~_umask())
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
            raise
        return True

    def _blob_digest(self, path: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with self.fs.open(path, "rb") as fh:
            for chunk in file_chunks(fh):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    @contextlib.contextmanager
    def _open_tmp(self, tmp: str):
        """A temporary blob, held under an flock while it is written (local): `collect_garbage` can then
        tell a killed publisher's leftover from a live writer's file."""
        if not self._local:
            with self.fs.open(tmp, "wb") as fh:
                yield fh
            return
        with open(tmp, "xb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield fh

    def collect_garbage(self, now: float | None = None) -> list[str]:
        """Remove `blobs/**/<digest>.tmp-<uuid>` left by killed publishes; never a live writer's.

        Local: a writer holds an flock on its temporary file, so a file whose lock can be taken has no
        writer. Other backends have no locks: only files older than STALE_TMP_SECONDS go."""
        removed = []
        clock = now if now is not None else datetime.now(timezone.utc).timestamp()
        pattern = re.compile(r"[0-9a-f]{64}\.tmp-[0-9a-f]{32}")
        blobs = self._path("blobs", "sha256")
        for prefix in self._ls_names(blobs):
            for entry in self._ls_names(posixpath.join(blobs, prefix)):
                if not pattern.fullmatch(entry):
                    continue
                path = posixpath.join(blobs, prefix, entry)
                if self._local:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:
                        continue  # its writer just finished
                    try:
                        if clock - os.fstat(fd).st_mtime < MIN_LEFTOVER_AGE_SECONDS:
                            continue  # a writer between create and flock, or between close and rename
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    else:
                        os.unlink(path)
                    finally:
                        os.close(fd)
                else:
                    modified = self.fs.modified(path).timestamp()
                    if clock - modified < STALE_TMP_SECONDS:
                        continue
                    self.fs.rm_file(path)
                removed.append(self._url(path))
                log.info("removed %s, left by an interrupted publish", self._url(path))
        return removed

    # ---- reading

    def _require_root(self) -> None:
        if not self.fs.exists(self.root):
            raise RegistryError(
                f"registry {self.url}",
                "does not exist.",
                "check the registry URL, or publish an artifact first.",
            )

    def names(self) -> list[str]:
        """Every artifact name with at least one version."""
        return [
            n
            for n in self._ls_names(self._path("artifacts"))
            if re.fullmatch(NAME_PATTERN, n) and self._version_numbers(n)
        ]

    def _version_numbers(self, name: str) -> list[tuple[int, int, int]]:
        found = []
        for entry in self._ls_names(self._path("artifacts", name, "versions")):
            stem, ext = posixpath.splitext(entry)
            if ext == ".json" and re.fullmatch(VERSION_PATTERN, stem):
                found.append(parse_version(stem))
        return sorted(found)

    def versions(self, name: str) -> list[str]:
        """Versions of `name`, oldest first (semantic order, not string order)."""
        validate_name(name)
        return [format_version(v) for v in self._version_numbers(name)]

    def stages(self, name: str) -> dict[str, str]:
        """Current stage labels of `name`: stage -> version (the newest event of each stage wins)."""
        validate_name(name)
        current = {}
        for stage in self._ls_names(self._path("artifacts", name, "stages")):
            events = [
                e
                for e in self._ls_names(self._path("artifacts", name, "stages", stage))
                if re.fullmatch(r"[0-9]{8}\.json", e)
            ]
            if events:
                path = self._path("artifacts", name, "stages", stage, events[-1])
                version = self._read_json(path).get("version")
                if not isinstance(version, str) or not re.fullmatch(VERSION_PATTERN, version):
                    raise VerificationError(self._url(path), f"names no valid version ({str(version)[:80]!r}).",
                                            "re-assign the stage (`forge publish ... --stage`).")
                current[stage] = version
        return current

    def _unknown_name(self, name: str) -> RegistryError:
        known = self.names()
        return RegistryError(
            f"registry {self.url}",
            f"has no artifact {name!r}; it has: {', '.join(known) if known else 'none'}.",
            "run `forge list` and pick one of those names.",
        )

    def resolve(self, name: str, version: str | None = None, stage: str | None = None) -> str:
        """The version that `version` / `stage` / (neither: newest) designates."""
        validate_name(name)
        if version is not None and stage is not None:
            raise RegistryError(f"artifact {name}", "both a version and a stage were given.", "give one of them.")
        existing = self.versions(name)
        if not existing:
            self._require_root()
            raise self._unknown_name(name)
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
        self._require_root()
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
        self._require_root()
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
        for name in self._ls_names(self._path("artifacts")):
            if name in published or not re.fullmatch(NAME_PATTERN, name):
                continue
            entries = self._ls_names(self._path("artifacts", name, "refusals"))
            if entries:
                try:
                    out.append(self._read_json(self._path("artifacts", name, "refusals", entries[-1])))
                except VerificationError as exc:
                    self.problems.append(str(exc))
        return out

    # ---- writing

    def _writable(self):
        """Turn a read-only or unreachable registry into one line instead of a PermissionError traceback."""
        url = self.url

        @contextlib.contextmanager
        def guard():
            try:
                yield
            except PermissionError as exc:
                raise RegistryError(f"registry {url}", f"is not writable ({exc.strerror or exc}: "
                                                       f"{exc.filename or url}).",
                                    "publish to a registry this user may write, or fix its permissions.") from exc
            except NotADirectoryError as exc:
                raise RegistryError(f"registry {url}", f"a path inside it is a file ({exc.filename}).",
                                    "pass a registry directory.") from exc
        return guard()

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
        files = _bundle_files(bundle)
        meta = json.loads(_canonical(metadata))  # a plain-JSON copy: the caller's dict is never kept
        with self._writable():
            self.collect_garbage()
            uploaded = sum(self._upload_blob(bundle / f["relpath"], f["sha256"], f["size"]) for f in files)
            log.info("%s: %d files, %d new blobs", name, len(files), uploaded)
            for _ in range(MAX_PUBLISH_ATTEMPTS):
                existing = self._version_numbers(name)
                if existing:
                    newest = format_version(existing[-1])
                    if _same_content(self._read_json(self._manifest_path(name, newest)), files, meta):
                        log.info("%s %s already has this content; nothing published", name, newest)
                        return PublishResult(name, newest, self._url(self._manifest_path(name, newest)), created=False)
                version = format_version(_next_version(existing))
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
                    self._create_exclusive(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
                except FileExistsError:
                    log.info("%s %s was taken by another publisher; trying the next version", name, version)
                    continue
                log.info("published %s %s", name, version)
                return PublishResult(name, version, self._url(path), created=True)
        raise RegistryError(
            f"artifact {name}",
            f"lost the race for a new version {MAX_PUBLISH_ATTEMPTS} times.",
            "check that the registry backend supports exclusive create, then publish again.",
        )

    def record_refusal(self, name: str, metadata: Mapping[str, Any], reason: str) -> None:
        """Note that `name` was built but refused by its gate, so `forge list --gpu` can say so (no blobs)."""
        validate_name(name)
        record = {"name": name, "reason": reason, "metadata": json.loads(_canonical(metadata))}
        body = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        key = hashlib.sha256(_canonical(_strip_timestamps(record)).encode()).hexdigest()[:16]
        with self._writable():
            try:
                self._create_exclusive(self._path("artifacts", name, "refusals", f"{key}.json"), body)
            except FileExistsError:
                pass  # the same refusal, recorded by an earlier run

    def assign_stage(self, name: str, version: str, stage: str) -> StageAssignment:
        """Label `version` of `name` with `stage` by appending an event (earlier labels stay as history)."""
        validate_name(stage, kind="stage name")
        resolved = self.resolve(name, version=version)
        folder = self._path("artifacts", name, "stages", stage)
        with self._writable():
            for _ in range(MAX_PUBLISH_ATTEMPTS):
                seqs = [int(e[:8]) for e in self._ls_names(folder) if re.fullmatch(r"[0-9]{8}\.json", e)]
                seq = max(seqs, default=0) + 1
                event = {
                    "name": name,
                    "stage": stage,
                    "version": resolved,
                    "seq": seq,
                    "assigned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                try:
                    self._create_exclusive(
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
        return place_verified(name, manifest, dest, problems, progress, self._fetch_verified)

    def _fetch_verified(self, entry: Mapping[str, Any], staging: Path, where: str, bar: ByteProgress) -> None:
        blob = self._blob_path(entry["sha256"])
        try:
            with self.fs.open(blob, "rb") as src:
                copy_verified(file_chunks(src), staging / entry["relpath"], entry, where, bar)
        except FileNotFoundError as exc:
            raise VerificationError(
                where,
                f"file {entry['relpath']}: blob sha256 {entry['sha256']} is missing from the registry.",
                "re-publish the artifact from its bundle.",
            ) from exc


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _open_fs(url: str):
    """fsspec's filesystem for `url`, or one line naming the scheme or the extra that is missing."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        extra = EXTRAS.get(protocol)
        fix = (f"pip install 'forge-quant[{extra}]'" if extra else f"install the fsspec backend for {protocol}://")
        raise RegistryError(f"registry {url}", f"{protocol}:// needs a package that is not installed ({exc}).",
                            fix + ".") from None
    except ValueError as exc:
        raise RegistryError(f"registry {url}", f"unknown URL scheme {protocol!r} ({exc}).",
                            "use a directory, oci://HOST/NAMESPACE, http(s):// (plain layout), s3:// or gs://.") from None
