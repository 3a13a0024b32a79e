"""Counting events per key in moving windows, for refusing floods.

The rates keep the ``limits`` notation (``"10/minute;100/hour"``), parsed by
``limits``. The counting is ours, for two reasons measured on this 2-core machine:

- ``limits``' in-memory storage starts a ``threading.Timer`` every 10 ms while events
  come in, to expire old ones. In the embedded broker each CONNECT counted an event on
  the event loop, and during a burst of sign-ins 15% of the loop's samples (py-spy)
  were ``Throttle.hit``, two thirds of that waiting in ``Thread.start`` for a timer
  thread to be scheduled while the chat waited behind it. The bridge's message rate
  left ``limits`` for the same reason (0.13-0.18 of a core for 1,000 senders).
- Its storage keeps every key until its window passes, with no bound on how many:
  source addresses and attempted usernames come from whoever connects.

So each key keeps the times of its last ``amount`` events (the most any window needs:
a window is full when its ``amount``-th latest event is still inside it), in a
``cachetools.TTLCache`` that forgets a key once its longest window has passed and
holds at most ``keys`` of them (the least recently used go first).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Final

from cachetools import TTLCache
from limits import parse_many

#: Keys remembered at most per throttle; each costs a few hundred bytes.
KEYS: Final = 100_000


class Throttle:
    """Events per key, in one or more moving windows (``"10/minute;100/hour"``).

    In memory: each process counts on its own, and a restart forgets. Thread-safe:
    the history API counts from worker threads, the broker from its event loop.

    Raises:
        ValueError: ``rates`` is not a ``limits`` rate string.
    """

    def __init__(self, rates: str, *, keys: int = KEYS) -> None:
        self.rates = [(item.amount, float(item.get_expiry())) for item in parse_many(rates)]
        self._depth = max(amount for amount, _ in self.rates)
        horizon = max(period for _, period in self.rates)
        self._events: TTLCache[tuple[str, ...], deque[float]] = TTLCache(
            keys, horizon, timer=time.monotonic
        )
        self._lock = threading.Lock()

    def allowed(self, *key: str) -> bool:
        """Whether one more event for ``key`` fits every window (counts nothing)."""
        with self._lock:
            return self._wait(key, time.monotonic()) == 0

    def hit(self, *key: str) -> bool:
        """Count an event for ``key``; False, counting nothing, if a window is full."""
        now = time.monotonic()
        with self._lock:
            if self._wait(key, now) > 0:
                return False
            events = self._events.get(key)
            if events is None:
                events = deque(maxlen=self._depth)
            events.append(now)
            # Set again on every event: the key lives a whole horizon past its last one.
            self._events[key] = events
            return True

    def retry_after(self, *key: str) -> int:
        """Whole seconds until ``key`` may have one more event (0: now)."""
        with self._lock:
            wait = self._wait(key, time.monotonic())
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def _wait(self, key: tuple[str, ...], now: float) -> float:
        """Seconds until every window of ``key`` has room (0: it has now)."""
        events = self._events.get(key)
        if not events:
            return 0.0
        wait = 0.0
        for amount, period in self.rates:
            if len(events) >= amount:
                wait = max(wait, events[-amount] + period - now)
        return wait
