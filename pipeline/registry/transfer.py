"""What every pull shares, whichever registry it reads: the file list is checked before any byte is
fetched, each file is verified while it streams, and the destination appears all at once.

* `check_entries`: a manifest's file list is untrusted input (a registry can be tampered with).
  Paths must be plain relative paths, digests 64 hex characters (a digest becomes a blob path in
  the directory registry: `../../etc/hostname` must never be opened), sizes non-negative
  integers, no entry may be a directory of another (`checkpoint` beside `checkpoint/config.json`)
  and none may take a name that pull writes itself.
* `staged_pull`: files land in `.<dest>.partial-<random>` beside the destination, which is renamed
  into place when every file verified. The staging directory is held under an flock(2) while it is
  filled, so the next pull can tell a killed pull's leftover (lock free: removed) from a live one
  (lock held: left alone).
* Modes: mkdtemp makes 0700 directories and the registry's files may be 0600; a serving container
  that runs as another user than the init container that pulled needs to read them, so directories
  end 0755 and files 0644, minus the process umask (as `mkdir`/`cp` would do).
* `ByteProgress`: a byte counter with rate and ETA on a terminal, silent off one (CI logs, DVC).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pipeline.core.errors import RegistryError, VerificationError
from pipeline.core.files import CHUNK, sha256_file

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# A leftover (pull staging folder, publish temporary blob) whose lock is free and that nobody touched for a
# minute has no live writer: a younger one may belong to a writer between creating it and taking its lock.
MIN_LEFTOVER_AGE_SECONDS = 60
DEST_FIX = "pull into a new directory, or remove this one first."


def check_entries(files: Any, where: str, reserved: Iterable[str] = ()) -> list[dict]:
    """The manifest's `files`, checked (see module docstring); VerificationError names the first bad entry."""
    fix = "the manifest is corrupt or was tampered with; re-publish the artifact from its bundle."
    if not isinstance(files, list) or not files:
        raise VerificationError(where, "manifest has no `files` list.", fix)
    reserved = set(reserved)
    seen: set[str] = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, Mapping):
            raise VerificationError(where, f"manifest files[{i}] is not a mapping.", fix)
        missing = [k for k in ("relpath", "sha256", "size") if k not in entry]
        if missing:
            raise VerificationError(where, f"manifest files[{i}] has no {', '.join(missing)}.", fix)
        relpath, sha, size = entry["relpath"], entry["sha256"], entry["size"]
        safe_relpath(relpath, where)
        if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
            raise VerificationError(where, f"file {relpath}: sha256 {str(sha)[:80]!r} is not 64 hex digits.", fix)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise VerificationError(where, f"file {relpath}: size {size!r} is not a non-negative integer.", fix)
        if relpath in reserved:
            raise VerificationError(where, f"file {relpath}: that name is written by pull itself.", fix)
        if relpath in seen:
            raise VerificationError(where, f"file {relpath} is listed twice.", fix)
        seen.add(relpath)
    for relpath in seen:
        parts = relpath.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in seen:
                raise VerificationError(where, f"file {'/'.join(parts[:depth])} is also a directory of {relpath}.",
                                        fix)
    return files


def safe_relpath(relpath: Any, where: str) -> str:
    parts = relpath.split("/") if isinstance(relpath, str) else []
    if (not parts or relpath.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in relpath
            or "\0" in relpath or "\n" in relpath or "\r" in relpath):
        raise VerificationError(where, f"manifest lists an unsafe file path {str(relpath)[:200]!r}.",
                                "the manifest is corrupt; re-publish.")
    return relpath


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def make_public(root: Path) -> None:
    """Directories 0755 and files 0644 under `root` (and `root` itself), minus the umask."""
    mask = umask()
    os.chmod(root, 0o755 & ~mask)
    for base, dirs, names in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), 0o755 & ~mask)
        for n in names:
            os.chmod(os.path.join(base, n), 0o644 & ~mask)


def _try_lock(path: str) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def collect_partials(target: Path) -> list[Path]:
    """Remove `.<target>.partial-*` left by killed pulls (their lock is free); live ones stay."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for leftover in sorted(target.parent.glob(f".{target.name}.partial-*")):
        try:
            if time.time() - leftover.stat().st_mtime < MIN_LEFTOVER_AGE_SECONDS:
                continue  # possibly a pull between mkdtemp and flock
            fd = _try_lock(str(leftover))
        except OSError:
            continue
        if fd is None:
            log.info("%s belongs to a pull still running; left alone", leftover)
            continue
        try:
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
            log.info("removed %s, left by an interrupted pull", leftover)
        finally:
            os.close(fd)
    return removed


def check_destination(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RegistryError(f"destination {target}", "already exists and is not an empty directory.", DEST_FIX)


def holds_verified(target: Path, where: str, manifest: Mapping[str, Any], record_file: str) -> bool:
    """Whether `target` already holds the version `manifest` describes, exactly as a pull leaves it
    (`record_file`, SHA256SUMS, every file's size and sha256 checked): re-running a pull, say an init
    container's after a restart, is then a no-op. False for a new or empty directory; RegistryError when
    it holds anything else (another version, changed or extra files), which a pull never overwrites."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return False
    if not (target / record_file).is_file():
        check_destination(target)  # files, but not a pull's: refused as before
    dest = f"destination {target}"
    try:
        held = json.loads((target / record_file).read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(dest, f"holds an unreadable {record_file} ({exc}).", DEST_FIX) from None
    label = f"{held.get('name')} {held.get('version')}" if isinstance(held, dict) else "something else"
    if label != where:
        raise RegistryError(dest, f"already holds {label}, not {where}.", DEST_FIX)
    files = [(f["relpath"], f["sha256"], f["size"]) for f in manifest["files"]]
    listed = [f for f in held.get("files") or [] if isinstance(f, Mapping)]
    if sorted(files, key=str) != sorted(((f.get("relpath"), f.get("sha256"), f.get("size")) for f in listed), key=str):
        raise RegistryError(dest, f"holds a {where} whose file list differs from the registry's.", DEST_FIX)
    on_disk = {p.relative_to(target).as_posix() for p in target.rglob("*") if not p.is_dir()}
    expected = {f[0] for f in files} | {record_file, SUMS_FILE}
    if on_disk != expected:
        changes = [*(f"{p} added" for p in sorted(on_disk - expected)), *(f"{p} missing" for p in sorted(expected - on_disk))]
        raise RegistryError(dest, f"holds {where} with other files ({', '.join(changes[:5])}).", DEST_FIX)
    for relpath, sha, size in files:
        path = target / relpath
        if path.is_symlink() or path.stat().st_size != size or sha256_file(path) != sha:
            raise RegistryError(dest, f"holds {where}, but {relpath} no longer matches its sha256.", DEST_FIX)
    if (target / SUMS_FILE).read_text() != sha256sums(manifest["files"]):
        raise RegistryError(dest, f"holds {where}, but its {SUMS_FILE} was changed.", DEST_FIX)
    return True


@contextlib.contextmanager
def staged_pull(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a locked staging directory; on success it becomes `dest` (public modes), else it is removed."""
    target = Path(dest).absolute()
    check_destination(target)
    collect_partials(target)
    created_parents = [p for p in reversed(target.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    lock = _try_lock(str(staging))
    try:
        yield staging
        make_public(staging)
        try:
            os.rename(staging, target)  # replaces an empty directory atomically on POSIX
        except OSError as exc:
            raise RegistryError(f"destination {target}", f"could not be put in place ({exc}).",
                                "pull into a new directory.") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created_parents):
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    finally:
        if lock is not None:
            os.close(lock)


class ByteProgress:
    """Bytes fetched of `total`, drawn with rich on a terminal; `enabled=False` draws nothing."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def copy_verified(chunks: Iterable[bytes], out: Path, entry: Mapping[str, Any], where: str,
                  progress: ByteProgress | None = None) -> None:
    """Write `chunks` to `out`, then refuse (VerificationError) unless size and sha256 match `entry`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(out, "wb") as dst:
        for chunk in chunks:
            size += len(chunk)
            if size > entry["size"]:
                break  # never write more than the manifest promised (a hostile server can stream forever)
            digest.update(chunk)
            dst.write(chunk)
            if progress is not None:
                progress.advance(len(chunk))
    if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        got = f"more than {entry['size']} bytes" if size > entry["size"] else f"sha256 {digest.hexdigest()} ({size} bytes)"
        raise VerificationError(
            where, f"file {entry['relpath']}: expected sha256 {entry['sha256']} ({entry['size']} bytes), got {got}.",
            "the registry copy is corrupt or truncated; re-publish the artifact from its bundle.")


def file_chunks(fh: BinaryIO) -> Iterator[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk


SUMS_FILE = "SHA256SUMS"


def sha256sums(files: Iterable[Mapping[str, Any]]) -> str:
    """`sha256sum` output for `files` ("<hex>  <path>", binary-safe: sha256sum -c reads it as is)."""
    return "".join(f"{f['sha256']}  {f['relpath']}\n" for f in sorted(files, key=lambda f: f["relpath"]))
