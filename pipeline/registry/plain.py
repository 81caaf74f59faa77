"""The plain layout: a version is an ordinary directory, so object stores and web servers serve it as is.

    <root>/index.json                         {"artifacts": [names]}
    <root>/<name>/index.json                  {"versions": [...], "stages": {stage: version}}
    <root>/<name>/<version>/<bundle files>    the files, under their own paths
    <root>/<name>/<version>/SHA256SUMS        `sha256sum -c SHA256SUMS` verifies the directory
    <root>/<name>/<version>/forge.json        forge's manifest (name, version, metadata, files)
    <root>/<name>/.claims/<version>           created exclusively: who publishes which version

`aws s3 sync`, `gsutil rsync`, KServe `storageUri` or `curl` take `<root>/<name>/<version>/` without
forge. Written with `--registry plain+DIR` (or `plain+s3://...`, `plain+gs://...` through fsspec);
read from there or over `http(s)://`, where forge reads with plain GETs (no range requests, which
many static servers do not implement: fsspec's HTTP filesystem needs them for random access) and
the index files stand in for a directory listing.

A version exists once its forge.json does: files are written first, SHA256SUMS, then forge.json, so
a reader never sees a version whose files are incomplete. Versions are claimed by exclusive create
(`.claims/<version>`, as the directory registry creates manifests), so racing publishers get distinct
versions; a killed publisher leaves a claim and a version without forge.json that nothing lists.
The index files are rewritten after each publish (last writer wins; on a listable store the
directories are authoritative, and a lost index entry comes back with the next publish).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from pipeline.core.errors import RegistryError, VerificationError
from pipeline.core.local_gpu import LocalGpu
from pipeline.registry.artifacts import (
    MANIFEST_FILENAME,
    MANIFEST_SCHEMA,
    MAX_PUBLISH_ATTEMPTS,
    NAME_PATTERN,
    VERSION_PATTERN,
    ManifestListing,
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
    validate_metadata,
    validate_name,
)
from pipeline.registry.fsstorage import FsStorage
from pipeline.registry.selection import check_compatible, sizing_caveats
from pipeline.registry.transfer import (
    SUMS_FILE,
    ByteProgress,
    check_entries,
    copy_verified,
    file_chunks,
    sha256sums,
    umask,
)
from pipeline.registry.waiting import DEFAULT_TIMEOUT_S, Deadline

log = logging.getLogger(__name__)

FORGE_FILE = "forge.json"
INDEX_FILE = "index.json"
PLAIN_RESERVED = (MANIFEST_FILENAME, SUMS_FILE, FORGE_FILE)


class PlainRegistry(VersionResolver, ManifestListing):
    """`plain+<dir or fsspec URL>` (read and write) or `http(s)://...` (read only)."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = url
        self.deadline = Deadline(url, timeout_s)  # over HTTP; through fsspec its library's own timeouts apply
        self.http = url.startswith(("http://", "https://"))
        self.base = url.rstrip("/") if self.http else url[len("plain+"):]
        self.store = None if self.http else FsStorage(self.base)  # fsspec, and one-line URL errors
        self.problems: list[str] = []

    # ---- io

    def _where(self, *parts: str) -> str:
        return "/".join([self.base, *parts]) if self.http else self.store.url_of(self.store.path(*parts))

    def _chunks(self, *parts: str) -> Iterator[bytes]:
        """The bytes of a file under the root; FileNotFoundError if absent."""
        if not self.http:
            with self.store.fs.open(self.store.path(*parts), "rb") as fh:
                yield from file_chunks(fh)
            return
        url = self._where(*parts)
        try:
            with self.deadline.waiting(f"GET {url}"):
                response = requests.get(url, stream=True, timeout=self.deadline.requests_timeout)
            with response:
                if response.status_code == 404:
                    raise FileNotFoundError(url)
                if response.status_code != 200:
                    raise RegistryError(f"registry {self.url}", f"GET {url} answered HTTP {response.status_code}.",
                                        "check the URL and the server.")
                yield from response.iter_content(1 << 20)
        except requests.RequestException as exc:
            raise self.deadline.failure(f"GET {url}", exc) from None

    def _json(self, *parts: str) -> dict:
        raw = b"".join(self._chunks(*parts))
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VerificationError(self._where(*parts), f"is not valid JSON ({exc}).", "re-publish.") from None
        if not isinstance(value, dict):
            raise VerificationError(self._where(*parts), "is not a JSON object.", "re-publish.")
        return value

    def _index(self, *parts: str) -> dict:
        try:
            return self._json(*parts, INDEX_FILE)
        except FileNotFoundError:
            if not parts:
                raise RegistryError(f"registry {self.url}", f"has no {INDEX_FILE}: not a forge plain-layout registry.",
                                    "publish with --registry plain+DIR and serve that directory.") from None
            return {}

    def _put(self, data: bytes, *parts: str) -> None:
        path = self.store.path(*parts)
        self.store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if self.store.local:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644 & ~umask())
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        else:
            with self.store.fs.open(path, "wb") as fh:
                fh.write(data)

    # ---- reading

    def names(self) -> list[str]:
        if self.http:
            names = self._index().get("artifacts") or []
        else:
            self.store.require_root()
            names = self.store.ls_names(self.store.root)
        return sorted(n for n in names if isinstance(n, str) and re.fullmatch(NAME_PATTERN, n) and self.versions(n))

    def versions(self, name: str) -> list[str]:
        validate_name(name)
        if self.http:
            found = self._index(name).get("versions") or []
        else:
            found = [v for v in self.store.ls_names(self.store.path(name))
                     if self.store.fs.exists(self.store.path(name, v, FORGE_FILE))]
        return [format_version(v) for v in sorted(parse_version(v) for v in found
                                                  if isinstance(v, str) and re.fullmatch(VERSION_PATTERN, v))]

    def stages(self, name: str) -> dict[str, str]:
        stages = self._index(name).get("stages") or {}
        return {s: v for s, v in stages.items() if isinstance(v, str) and re.fullmatch(VERSION_PATTERN, v)}

    def require_root(self) -> None:
        if self.http:
            self._index()
        else:
            self.store.require_root()

    def get_manifest(self, name: str, version: str | None = None, stage: str | None = None) -> dict:
        resolved = self.resolve(name, version=version, stage=stage)
        where = self._where(name, resolved, FORGE_FILE)
        manifest = self._json(name, resolved, FORGE_FILE)
        if manifest.get("name") != name or manifest.get("version") != resolved:
            raise VerificationError(where, f"names {manifest.get('name')!r} {manifest.get('version')!r}, not its "
                                           f"directory {name}/{resolved}.", "re-publish.")
        if not isinstance(manifest.get("metadata"), dict):
            raise VerificationError(where, "has no `metadata` mapping.", "re-publish.")
        check_entries(manifest.get("files"), where, reserved=PLAIN_RESERVED)
        return manifest

    def refusals(self) -> list[dict]:
        return []  # the plain layout holds only what passed its gate

    # ---- writing

    def _writable(self) -> FsStorage:
        if self.store is None:
            raise RegistryError(f"registry {self.url}", "is read-only over HTTP: nothing can be published or "
                                                        "promoted through it.",
                                "write to the directory or bucket the server serves (--registry plain+DIR).")
        return self.store

    def record_refusal(self, name: str, metadata: Mapping[str, Any], reason: str) -> None:
        log.info("%s: refused by its gate; nothing written to %s (%s)", name, self.url, reason)

    def publish(self, bundle_dir: str | os.PathLike, name: str, metadata: Mapping[str, Any],
                now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> PublishResult:
        store = self._writable()
        validate_name(name)
        validate_metadata(metadata)
        bundle = Path(bundle_dir)
        files = bundle_files(bundle)
        meta = json.loads(canonical(metadata))
        with store.writable():
            existing = self.versions(name)
            if existing and same_content(self.get_manifest(name, existing[-1]), files, meta):
                return PublishResult(name, existing[-1], self._where(name, existing[-1]), created=False)
            version = self._claim(name)
            for entry in files:
                self._copy_in(bundle / entry["relpath"], entry, name, version)
            self._put(sha256sums(files).encode(), name, version, SUMS_FILE)
            manifest = {"schema": MANIFEST_SCHEMA, "name": name, "version": version,
                        "published_at": now().isoformat(timespec="seconds"), "metadata": meta, "files": files,
                        "total_bytes": sum(f["size"] for f in files)}
            self._put((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), name, version, FORGE_FILE)
            self._write_indexes(name)
        log.info("published %s %s to %s", name, version, self.url)
        return PublishResult(name, version, self._where(name, version), created=True)

    def _claim(self, name: str) -> str:
        store = self.store
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            claimed = [parse_version(v) for v in store.ls_names(store.path(name, ".claims"))
                       if re.fullmatch(VERSION_PATTERN, v)]
            done = [parse_version(v) for v in self.versions(name)]
            version = format_version(next_version(claimed + done))
            try:
                store.create_exclusive(store.path(name, ".claims", version), b"")
            except FileExistsError:
                continue
            return version
        raise RegistryError(f"artifact {name}", "could not claim a version.", "publish again.")

    def _copy_in(self, source: Path, entry: Mapping[str, Any], name: str, version: str) -> None:
        digest = hashlib.sha256()
        with open(source, "rb") as src:
            data_iter = file_chunks(src)
            path = self.store.path(name, version, entry["relpath"])
            self.store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.store.fs.open(path, "wb") as dst:
                for chunk in data_iter:
                    digest.update(chunk)
                    dst.write(chunk)
        if self.store.local:
            os.chmod(path, 0o644 & ~umask())
        if digest.hexdigest() != entry["sha256"]:
            raise RegistryError(f"bundle file {source}", "changed while it was being published.",
                                "let the stage that writes it finish, then publish again.")

    def _write_indexes(self, name: str, stages: Mapping[str, str] | None = None) -> None:
        body = {"versions": self.versions(name), "stages": dict(stages if stages is not None else self.stages(name))}
        self._put((json.dumps(body, indent=2, sort_keys=True) + "\n").encode(), name, INDEX_FILE)
        self._put((json.dumps({"artifacts": self.names()}, indent=2) + "\n").encode(), INDEX_FILE)

    def assign_stage(self, name: str, version: str, stage: str) -> StageAssignment:
        self._writable()
        validate_name(stage, kind="stage name")
        resolved = self.resolve(name, version=version)
        self._write_indexes(name, {**self.stages(name), stage: resolved})
        return StageAssignment(name, stage, resolved, 0)

    # ---- pulling

    def pull(self, name: str, dest: str | os.PathLike, *, version: str | None = None, stage: str | None = None,
             force: bool = False, local_gpu: LocalGpu | None = None,
             runtime_versions: Mapping[str, str | None] | None = None, progress: bool = False) -> PullResult:
        manifest = self.get_manifest(name, version=version, stage=stage)
        resolved = manifest["version"]
        where = f"{name} {resolved}"
        problems = check_compatible(manifest, where, local_gpu, runtime_versions, force)
        sums = b"".join(self._chunks(name, resolved, SUMS_FILE)).decode(errors="replace")
        if sums != sha256sums(manifest["files"]):
            raise VerificationError(where, f"{SUMS_FILE} does not list the files and digests of {FORGE_FILE}.",
                                    "re-publish the artifact.")

        def fetch(entry: Mapping[str, Any], staging: Path, where: str, bar: ByteProgress) -> None:
            try:
                copy_verified(self._chunks(name, resolved, *entry["relpath"].split("/")),
                              staging / entry["relpath"], entry, where, bar)
            except FileNotFoundError:
                raise VerificationError(where, f"file {entry['relpath']} is missing from the registry.",
                                        "re-publish the artifact.") from None

        return place_verified(name, manifest, dest, problems, progress, fetch,
                              sizing_caveats(manifest, local_gpu))
