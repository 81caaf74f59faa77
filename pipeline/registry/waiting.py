"""How long forge waits on a registry, and what it says while it waits.

One deadline for every registry that answers over a network (`--timeout-s`, else the environment
variable TIMEOUT_ENV, else DEFAULT_TIMEOUT_S; declared once in pipeline/registry/args.py): the longest
forge waits on the registry at any one moment, to connect, for an answer, or for the next bytes of a
file. It bounds each wait, not a whole transfer: a pull of many gigabytes takes as long as its bytes
take, while a registry that stops answering fails at the deadline. (Before there was one, a silent
HTTP server failed after 61 s and an OCI registry after 31 s, with nothing said in between.)

`Deadline.waiting(what)` logs a line every NOTICE_EVERY_S while a wait lasts (what forge waits for,
for how long so far, when it gives up), so a slow registry is never silent; `Deadline.failure(what, exc)`
turns a requests exception into one RegistryError naming the registry, the wait, the deadline and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import requests
from urllib3.exceptions import ReadTimeoutError

from pipeline.core.errors import RegistryError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "FORGE_REGISTRY_TIMEOUT_S"
TIMEOUT_FLAG = "--timeout-s"
NOTICE_EVERY_S = 5.0


def resolve_timeout(flag_value: float | None) -> float:
    """The deadline in seconds: the flag, else $FORGE_REGISTRY_TIMEOUT_S, else the default."""
    if flag_value is not None:
        value, source = flag_value, TIMEOUT_FLAG
    else:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None or not text.strip():
            return DEFAULT_TIMEOUT_S
        source = f"${TIMEOUT_ENV}"
        try:
            value = float(text)
        except ValueError:
            raise RegistryError(source, f"{text!r} is not a number of seconds.",
                                f"set it to e.g. {DEFAULT_TIMEOUT_S:g}, or unset it for the default.") from None
    if not math.isfinite(value) or value <= 0:
        raise RegistryError(source, f"must be a positive number of seconds, got {value:g}.",
                            f"pass e.g. {TIMEOUT_FLAG} {DEFAULT_TIMEOUT_S:g} (the default).")
    return float(value)


@dataclass(frozen=True)
class Deadline:
    url: str
    seconds: float = DEFAULT_TIMEOUT_S

    @property
    def requests_timeout(self) -> tuple[float, float]:
        # requests' (connect, read): the read timeout bounds each wait for bytes, which is this deadline.
        return (self.seconds, self.seconds)

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Log what forge waits for every NOTICE_EVERY_S while the block runs."""
        stop = threading.Event()
        start = time.monotonic()

        def notice() -> None:
            while not stop.wait(NOTICE_EVERY_S):
                log.info("still waiting for registry %s (%s): %.0f s so far; a wait of %g s fails (%s)",
                         self.url, what, time.monotonic() - start, self.seconds, TIMEOUT_FLAG)

        thread = threading.Thread(target=notice, name=f"forge-wait {self.url}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def exceeded(self, what: str) -> RegistryError:
        return RegistryError(f"registry {self.url}", f"{what}: no answer within the {self.seconds:g} s deadline.",
                             "check that the registry is up and reachable from here, or wait longer with "
                             f"{TIMEOUT_FLAG} SECONDS (or ${TIMEOUT_ENV}).")

    def failure(self, what: str, exc: requests.RequestException) -> RegistryError:
        """`exc` as one line: the deadline when it was a wait that timed out, else what failed."""
        if is_timeout(exc):
            return self.exceeded(what)
        return RegistryError(f"registry {self.url}", f"{what} failed ({type(exc).__name__}).",
                             "check that the registry is up and the URL is right.")


def is_timeout(exc: BaseException) -> bool:
    """requests raises Timeout before the answer, and ConnectionError wrapping urllib3's
    ReadTimeoutError when a streamed body stalls (requests/models.py iter_content)."""
    return isinstance(exc, requests.Timeout) or any(isinstance(a, ReadTimeoutError) for a in exc.args)
