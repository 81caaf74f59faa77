"""Total deadlines for network calls.

urllib's `timeout` bounds each socket operation, not the request: a server that sends one byte
every few seconds (or drips its headers) keeps `urlopen(..., timeout=10)` alive forever, and
huggingface_hub / datasets apply their own per-request timeouts the same way. Two tools here:

- `open_within(url, headers, total_s)`: urlopen whose whole exchange (headers and the body the
  caller reads inside the `with`) ends within `total_s`. A watchdog timer shuts the connection's
  socket down at the deadline, which wakes a blocked recv (shutdown(2)); the caller then gets
  `DeadlineExceeded`, never a truncated body.
- `call_within(fn, total_s, what)`: run a library call that opens its own connections
  (snapshot_download, load_dataset) in a worker thread and give up at the deadline. The worker
  cannot be cancelled; it is a daemon thread, and the CLI exits with the error.

`transfer_deadline(size_bytes, base_s)` is the deadline for a transfer of known size: `base_s` plus
the time the bytes take at MIN_RATE_BYTES_S; slower than that on average counts as hung.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# 100 kB/s: a 1 GB shard may take ~3 h before it counts as hung; a drip-feed never finishes.
MIN_RATE_BYTES_S = 100_000
# Per socket operation: a stall shows up quickly even when the total deadline is long.
READ_TIMEOUT_S = 30.0


class DeadlineExceeded(TimeoutError):
    """The exchange with `endpoint` did not complete within `seconds`."""

    def __init__(self, endpoint: str, seconds: float):
        super().__init__(f"{endpoint} did not complete within the {seconds:g} s deadline")
        self.endpoint = endpoint
        self.seconds = seconds


def transfer_deadline(size_bytes: int | None, base_s: float, unknown_size_s: float = 1800.0) -> float:
    """Seconds allowed for fetching `size_bytes` (None: size unknown, `unknown_size_s` is used)."""
    if size_bytes is None:
        return max(base_s, unknown_size_s)
    return base_s + size_bytes / MIN_RATE_BYTES_S


class _Watchdog:
    """Shuts every registered socket down once `seconds` have passed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def __enter__(self) -> _Watchdog:  # noqa: PYI034 (final in use)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watched(base: type[http.client.HTTPConnection], watch: _Watchdog) -> type[http.client.HTTPConnection]:
    class Watched(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            # The connect (and TLS handshake) itself is bounded by the per-operation timeout.
            super().connect()
            watch.register(self.sock)

    return Watched


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watch: _Watchdog):
        super().__init__()
        self._watch = watch

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_watched(http.client.HTTPConnection, self._watch), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watch: _Watchdog):
        super().__init__()
        self._watch = watch

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_watched(http.client.HTTPSConnection, self._watch), req, context=self._context)


@contextlib.contextmanager
def open_within(url: str, headers: dict[str, str], total_s: float, endpoint: str | None = None,
                read_timeout_s: float = READ_TIMEOUT_S) -> Iterator[Any]:
    """`urllib.request.urlopen(url)` as a context manager whose whole exchange ends within
    `total_s`; raises DeadlineExceeded naming `endpoint` (default: the URL) when it does not.
    HTTP errors (urllib.error.HTTPError) and connection errors pass through unchanged."""
    endpoint = endpoint or url
    start = time.monotonic()
    with _Watchdog(total_s) as watch:
        opener = urllib.request.build_opener(_HTTPHandler(watch), _HTTPSHandler(watch))
        try:
            with opener.open(urllib.request.Request(url, headers=headers),
                             timeout=min(read_timeout_s, total_s)) as response:
                yield response
        except BaseException as exc:
            # A per-read timeout that ends at the deadline is the deadline too: one message either way.
            if watch.expired or (_is_timeout(exc) and time.monotonic() - start >= 0.99 * total_s):
                raise DeadlineExceeded(endpoint, total_s) from exc
            raise
        if watch.expired:  # the body may have ended early at the shutdown: never hand it on
            raise DeadlineExceeded(endpoint, total_s)


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


def call_within(fn: Callable[[], T], total_s: float, endpoint: str) -> T:
    """fn() in a daemon worker thread; its result, its exception, or DeadlineExceeded at `total_s`."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread below)
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"forge-fetch {endpoint}", daemon=True)
    worker.start()
    worker.join(total_s)
    if worker.is_alive():
        raise DeadlineExceeded(endpoint, total_s)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
