"""A witness for the disk: how long a small durable write takes, beside every step.

A durable commit returns only once its write-ahead log is on disk, so every message
of a batch waits for one ``fdatasync``. On a virtual machine that wait is the host's:
an 8 KiB write and ``fdatasync`` by an unrelated process, on the same file system,
stalls at the same moments PostgreSQL's commits do. This probe does just that, every
``interval`` seconds in a thread of the bench's main process (50 flushes a second,
next to PostgreSQL's hundreds), so a step's record says whether the disk stalled.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from bench._gen import new_histogram, percentiles
from bench._stack import SLOW_TURN_S

BLOCK = b"\0" * 8192
#: Slots of the probe file written in turn: it stays 1 MiB, no file system growth.
SLOTS = 128


class DiskProbe:
    """Write and flush 8 KiB every ``interval`` seconds until stopped; time each flush."""

    def __init__(
        self, directory: Path, interval: float = 0.02, stall_ms: float = SLOW_TURN_S * 1000
    ) -> None:
        self.path = directory / "disk-probe.dat"
        self.interval = interval
        self.stall_ms = stall_ms
        self.histogram = new_histogram()
        #: (wall-clock start, milliseconds) of every flush slower than ``stall_ms``.
        self.stalls: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-probe", daemon=True)

    def __enter__(self) -> DiskProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            n = 0
            while not self._stop.wait(self.interval):
                wall, started = time.time(), time.monotonic()
                os.pwrite(fd, BLOCK, (n % SLOTS) * len(BLOCK))
                os.fdatasync(fd)
                took_us = max(1, int((time.monotonic() - started) * 1e6))
                self.histogram.record_value(took_us)
                if took_us > self.stall_ms * 1000:
                    self.stalls.append((wall, took_us / 1000))
                n += 1
        finally:
            os.close(fd)
            self.path.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        return {**percentiles(self.histogram), "over_stall_ms": len(self.stalls)}

    def worst_between(self, start: float, end: float) -> float:
        """The slowest flush (ms) that was under way at some moment in [start, end]."""
        return max(
            (ms for at, ms in self.stalls if at <= end and at + ms / 1000 >= start),
            default=0.0,
        )
