"""Bounded HTTP for every source (PyPI index and files, Hub probes): one request whose whole exchange
ends within a deadline (pipeline/core/deadline.py), and the useful part of its failure for a message."""

from __future__ import annotations

import urllib.error
import urllib.parse
from typing import Any

from pipeline.core.deadline import DeadlineExceeded, open_within


def http_get(url: str, headers: dict[str, str], total_s: float, endpoint: str | None = None) -> Any:
    """A context manager around urlopen whose whole exchange, body included, ends within `total_s`
    (pipeline/core/deadline.py: urllib's own timeout bounds each socket read, not the request)."""
    return open_within(url, headers, total_s, endpoint)


def failure_reason(exc: BaseException) -> str:
    """The useful part of a urllib failure: 'timed out', 'Connection refused', 'HTTP 404'."""
    if isinstance(exc, DeadlineExceeded):
        return f"no complete answer within the {exc.seconds:g} s deadline"
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
