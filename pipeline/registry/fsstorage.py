"""A registry root reached through fsspec: a local directory or an s3://, gs://, az://, ssh:// URL.
The directory registry (pipeline/registry/directory.py) and the plain layout written to a directory or
bucket (pipeline/registry/plain.py) both store their files through it.

Exclusive create (`create_exclusive`), per backend:
  * local directories: the file is written to a temporary file in the same directory and
    hard-linked to its final name; link(2) fails with EEXIST if the name exists, so the final
    name appears atomically, complete, at most once. Filesystems without hard links fall back
    to open(O_CREAT | O_EXCL) (still exclusive, but a reader may briefly see a partial file).
  * other fsspec backends: `fs.open(path, "xb")`. s3fs sends `If-None-Match: *` (s3fs PR #917,
    fixed for small files in #974; needs botocore >= 1.33), adlfs maps it to overwrite=False
    (adlfs PR #491), gcsfs to ifGenerationMatch=0. **Limitation**: fsspec leaves "x" to the
    backend ("may be implemented by the backend", fsspec spec.py `open`); a backend that ignores
    it writes like "wb". To narrow that window the registry checks existence first and reads
    the file back after writing; a writer that finds someone else's bytes sees FileExistsError
    (and retries with the next version). Two writers whose write and read-back interleave exactly
    can still lose one file on such a backend. Backends with listing caches (s3fs) have them
    invalidated before every listing (`ls_names`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.errors import RegistryError, VerificationError
from pipeline.registry.transfer import umask

log = logging.getLogger(__name__)

# fsspec protocols whose implementation lives in an optional package, and the extra that brings it.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class FsStorage:
    """The files under `url` (a local directory or any fsspec URL). Creates nothing until written to."""

    def __init__(self, url: str | os.PathLike):
        self.url = os.fspath(url)
        self.fs, self.root = _open_fs(self.url)
        self.root = self.root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise RegistryError(f"registry {self.url}", "is a file, not a directory.",
                                "pass a registry directory (or a new path, created on first publish).")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, path: str) -> str:
        """How messages and results name `path`: a local path as is, else with its protocol."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def ls_names(self, path: str) -> list[str]:
        """The entries of the folder `path`, sorted (none when it does not exist)."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def read_json_object(self, path: str) -> dict:
        """The JSON object in the registry file `path`; VerificationError if it holds anything else.
        (Unlike pipeline.core.yamlio.read_json, which reads a small local input file and raises
        RecipeError, this reads through fsspec and treats a bad file as a damaged registry.)"""
        with self.fs.open(path, "rb") as fh:
            raw = fh.read()
        try:
            value = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VerificationError(
                self.url_of(path),
                f"is not valid JSON ({exc}).",
                "restore this file from a copy of the registry; registry files are never rewritten.",
            ) from exc
        if not isinstance(value, dict):
            raise VerificationError(self.url_of(path), f"holds a JSON {type(value).__name__}, not an object.",
                                    "restore this file from a copy of the registry.")
        return value

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Create `path` holding `data`; FileExistsError if it exists (see module docstring)."""
        parent = posixpath.dirname(path)
        self.fs.makedirs(parent, exist_ok=True)
        if self.local:
            _create_exclusive_local(path, data)
            return
        if self.fs.exists(path):
            raise FileExistsError(path)
        with self.fs.open(path, "xb") as fh:
            fh.write(data)
        self.fs.invalidate_cache(path)
        if self.fs.cat_file(path) != data:
            raise FileExistsError(path)

    def require_root(self) -> None:
        if not self.fs.exists(self.root):
            raise RegistryError(
                f"registry {self.url}",
                "does not exist.",
                "check the registry URL, or publish an artifact first.",
            )

    def writable(self):
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


def _create_exclusive_local(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~umask())  # mkstemp makes 0600; registry files are read by other users
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
