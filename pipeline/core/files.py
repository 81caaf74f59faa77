"""Files every stage writes: sha256 digests, atomic JSON and metrics, outputs staged beside their final
path and renamed in one step (crash-safe under kill -9), phase timers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageInputError
from pipeline.core.layout import MANIFEST_NAME

log = logging.getLogger(__name__)


CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(directory: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, dict[str, Any]]:
    """{relpath: {sha256, size}} for every regular file below directory, sorted, symlinks refused."""
    directory = Path(directory)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise StageInputError(str(path), "symbolic links are not allowed in stage outputs.", "copy the file instead.")
        if path.is_file():
            rel = path.relative_to(directory).as_posix()
            if rel in exclude:
                continue
            out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_metrics(path: Path, values: dict[str, Any]) -> None:
    """A stage's DVC metrics file, written atomically (a reader sees the old file or the new one) and
    as strict JSON (`allow_nan=False`: DVC cannot read NaN/Infinity; callers spell infinity "inf")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        Path(tmp).write_text(json.dumps(values, indent=2, allow_nan=False, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TMP_MARK = ".tmp-"  # `.<final>.tmp-<random>`: a stage output being written


OLD_MARK = ".old-"  # `.<final>.old-<pid>-<ns>`: the previous output, moved aside for the final rename


@contextlib.contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename,
    on any error it is removed. Readers never see a half-written output.

    The writer holds an exclusive flock on its temporary directory for as long as it lives; a
    process killed with -9 loses the lock with its file descriptors (flock(2)), so the next
    writer into the same parent removes what the dead one left (`collect_leftovers`) and never
    touches a live writer's directory."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    collect_leftovers(final.parent)
    tmp, lock = _locked_tmpdir(final)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; outputs are shared like any directory
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}{OLD_MARK}{os.getpid()}-{time.time_ns()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _locked_tmpdir(final: Path) -> tuple[Path, int]:
    """A fresh `.<final>.tmp-*` directory and an fd holding its flock. Between mkdtemp and flock a
    cleaner could take the still-unlocked directory; then the lock is on a removed inode (or the
    open fails) and a new directory is made."""
    import fcntl

    while True:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(tmp).st_ino:
                return tmp, fd
        except OSError:
            pass
        os.close(fd)


def collect_leftovers(parent: Path) -> list[Path]:
    """Remove `.<name>.tmp-*` / `.<name>.old-*` directories in `parent` whose writer is gone.

    A directory is a leftover when nobody holds its flock: `staged_output` locks its temporary
    directory before writing into it, so a live writer's directory is always locked. An `.old-*`
    directory is never locked: it exists only between two renames of a finishing writer, which
    removes it itself; removing it here as well is harmless (both ignore a missing tree).
    Returns the paths removed."""
    import fcntl

    removed: list[Path] = []
    try:
        candidates = [p for p in Path(parent).iterdir() if p.name.startswith(".") and p.is_dir()
                      and not p.is_symlink() and (TMP_MARK in p.name or OLD_MARK in p.name)]
    except OSError:
        return removed
    for path in sorted(candidates):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone already (its writer finished or another cleaner took it)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer holds it
        try:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.warning("removed %s (%.1f MB) left by an interrupted stage", path, size / 1e6)
        finally:
            os.close(fd)
    return removed


class Timer:
    """Collects named phase durations: `with timer("calibrate"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
