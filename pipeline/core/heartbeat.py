"""A heartbeat for long stages off a terminal.

Under DVC or CI there are no progress bars (tqdm is disabled there: pipeline/cli.py), and a
calibration of two minutes would print nothing at all. `heartbeat(progress)` logs one line every
`interval_s` while its block runs: the phase, how far it got, the time elapsed and, when the
total is known, an ETA from the rate so far. On a terminal it is silent (the bars show progress).

The stage owns a `Progress` and moves it (`phase(...)`, `advance()`); the heartbeat thread only
reads it, so a stage never blocks on logging.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

INTERVAL_S = 10.0


class Progress:
    """What a long stage is doing now; updated by the stage, read by the heartbeat."""

    def __init__(self, stage: str):
        self.stage = stage
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._phase = "starting"
        self._done = 0
        self._total: int | None = None
        self._unit = ""
        self._phase_start = self.start

    def phase(self, name: str, total: int | None = None, unit: str = "") -> None:
        with self._lock:
            self._phase, self._total, self._unit, self._done = name, total, unit, 0
            self._phase_start = time.monotonic()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._done += n

    def add_total(self, n: int) -> None:
        with self._lock:
            self._total = (self._total or 0) + n

    def line(self, now: float | None = None) -> str:
        """`calibrate x: calibration 12/32 batches (38%), 40 s elapsed, ETA 66 s`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            phase, done, total, unit, phase_start = self._phase, self._done, self._total, self._unit, self._phase_start
        elapsed = now - self.start
        text = f"{self.stage}: {phase}"
        if total:
            text += f" {min(done, total)}/{total} {unit} ({100 * min(done, total) / total:.0f}%)"
        elif done:
            text += f" {done} {unit}"
        text += f", {elapsed:.0f} s elapsed"
        if total and 0 < done < total:
            rate = done / max(now - phase_start, 1e-9)
            text += f", ETA {(total - done) / rate:.0f} s"
        return text


@contextlib.contextmanager
def heartbeat(progress: Progress, interval_s: float = INTERVAL_S, enabled: bool | None = None) -> Iterator[Progress]:
    """Log `progress.line()` every `interval_s` while the block runs (default: only off a terminal)."""
    if enabled is None:
        enabled = not sys.stderr.isatty()
    if not enabled:
        yield progress
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            log.info("%s", progress.line())

    thread = threading.Thread(target=beat, name=f"heartbeat {progress.stage}", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
