"""Counting events per key in moving windows, for refusing floods (``limits``)."""

from __future__ import annotations

import math
import time

from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class Throttle:
    """Events per key, in one or more moving windows (``"10/minute;100/hour"``).

    In memory: each process counts on its own, and a restart forgets.

    Raises:
        ValueError: ``rates`` is not a ``limits`` rate string.
    """

    def __init__(self, rates: str) -> None:
        self.rates = parse_many(rates)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def allowed(self, *key: str) -> bool:
        """Whether one more event for ``key`` fits every window (counts nothing)."""
        return all(self._limiter.test(rate, *key) for rate in self.rates)

    def hit(self, *key: str) -> bool:
        """Count an event for ``key``; False if a window was already full."""
        results = [self._limiter.hit(rate, *key) for rate in self.rates]
        return all(results)

    def retry_after(self, *key: str) -> int:
        """Whole seconds until ``key`` may have one more event (0: now)."""
        now = time.time()
        wait = 0.0
        for rate in self.rates:
            stats = self._limiter.get_window_stats(rate, *key)
            if stats.remaining <= 0:
                wait = max(wait, stats.reset_time - now)
        return max(1, math.ceil(wait)) if wait > 0 else 0
