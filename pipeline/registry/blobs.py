"""The directory registry's content-addressed blob store: `blobs/sha256/<first2>/<hexdigest>`, file
contents that are written once and never changed (pipeline/registry/directory.py writes the manifests
that name them).

A blob is written to `<digest>.tmp-<uuid>` and moved into place, so a reader never sees half of one.
A killed publisher leaves its temporary file behind; `collect_garbage` removes those without ever
touching a live writer's: locally a writer holds an flock(2) on its temporary file while it writes
(`open_tmp`), so a file whose lock can be taken has no writer; other backends have no locks, so only
files older than STALE_TMP_SECONDS go there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core.errors import RegistryError, VerificationError
from pipeline.core.files import CHUNK
from pipeline.registry.fsstorage import FsStorage
from pipeline.registry.transfer import (
    MIN_LEFTOVER_AGE_SECONDS,
    SHA256_HEX,
    ByteProgress,
    copy_verified,
    file_chunks,
    umask,
)

log = logging.getLogger(__name__)

# A `*.tmp-<uuid>` blob older than this whose writer cannot be asked (remote stores: no flock) is a
# killed publish's leftover; local ones are told apart by their writer's flock instead.
STALE_TMP_SECONDS = 24 * 3600


class BlobStore:
    """The blobs under `storage`'s `blobs/sha256/`."""

    def __init__(self, storage: FsStorage):
        self.storage = storage

    def blob_path(self, sha: str) -> str:
        if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):  # a digest becomes a path: hex only
            raise VerificationError(f"registry {self.storage.url}", f"sha256 {str(sha)[:80]!r} is not 64 hex digits.",
                                    "the manifest is corrupt or was tampered with; re-publish the artifact.")
        return self.storage.path("blobs", "sha256", sha[:2], sha)

    def upload(self, source: Path, sha: str, size: int) -> bool:
        """Copy `source` into the blob store unless an intact copy is there; True if it uploaded.

        An existing blob is re-hashed before it is trusted: a same-size corruption would otherwise
        survive every re-publish (the repair that pull's error message advises)."""
        fs = self.storage.fs
        final = self.blob_path(sha)
        fs.invalidate_cache(posixpath.dirname(final))
        if fs.exists(final):
            if self._digest(final) == (sha, size):
                return False
            log.warning("blob %s in the registry is corrupt (digest or size differ); replacing it", sha)
        fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as src, self.open_tmp(tmp) as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != sha:
                raise RegistryError(
                    f"bundle file {source}",
                    "changed while it was being published.",
                    "let the stage that writes it finish, then publish again.",
                )
            if self.storage.local:
                os.chmod(tmp, 0o644 & ~umask())
            fs.mv(tmp, final)
        except BaseException:
            if fs.exists(tmp):
                fs.rm_file(tmp)
            raise
        return True

    def _digest(self, path: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with self.storage.fs.open(path, "rb") as fh:
            for chunk in file_chunks(fh):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    @contextlib.contextmanager
    def open_tmp(self, tmp: str):
        """A temporary blob, held under an flock while it is written (local): `collect_garbage` can then
        tell a killed publisher's leftover from a live writer's file."""
        if not self.storage.local:
            with self.storage.fs.open(tmp, "wb") as fh:
                yield fh
            return
        with open(tmp, "xb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield fh

    def collect_garbage(self, now: float | None = None) -> list[str]:
        """Remove `blobs/**/<digest>.tmp-<uuid>` left by killed publishes; never a live writer's
        (see module docstring)."""
        storage = self.storage
        removed = []
        clock = now if now is not None else datetime.now(timezone.utc).timestamp()
        pattern = re.compile(r"[0-9a-f]{64}\.tmp-[0-9a-f]{32}")
        blobs = storage.path("blobs", "sha256")
        for prefix in storage.ls_names(blobs):
            for entry in storage.ls_names(posixpath.join(blobs, prefix)):
                if not pattern.fullmatch(entry):
                    continue
                path = posixpath.join(blobs, prefix, entry)
                if storage.local:
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
                    modified = storage.fs.modified(path).timestamp()
                    if clock - modified < STALE_TMP_SECONDS:
                        continue
                    storage.fs.rm_file(path)
                removed.append(storage.url_of(path))
                log.info("removed %s, left by an interrupted publish", storage.url_of(path))
        return removed

    def fetch_verified(self, entry: Mapping[str, Any], staging: Path, where: str, bar: ByteProgress) -> None:
        """Copy the blob of one manifest entry to `staging/<relpath>`, verifying size and sha256."""
        blob = self.blob_path(entry["sha256"])
        try:
            with self.storage.fs.open(blob, "rb") as src:
                copy_verified(file_chunks(src), staging / entry["relpath"], entry, where, bar)
        except FileNotFoundError as exc:
            raise VerificationError(
                where,
                f"file {entry['relpath']}: blob sha256 {entry['sha256']} is missing from the registry.",
                "re-publish the artifact from its bundle.",
            ) from exc
