"""Password checks with a bounded cost: few argon2 hashes at once, and no hash at all
for credentials verified a moment ago.

Each argon2 verification takes 64 MiB and tens of milliseconds of a core, and a correct
password is never throttled (only failures are). Forty clients signing in at once took
the history API from 95 to 1,662 MiB and stalled everyone else's requests for seconds;
fifty MQTT CONNECTs did the same to the embedded broker. So, per process::

    verify(username, stored hash, password)
        ├─ over ``rate`` sign-ins a second in this process (bursts of ``burst``) ──▶ Busy
        ├─ (username, stored hash, HMAC(password)) in the cache ──▶ True, no hash
        ├─ the same check already hashing in another thread ──▶ its answer, no hash
        └─ a hashing slot (at most ``concurrency`` at once: half the cores)
              ├─ free, or freed within ``wait`` ──▶ argon2 ──▶ cache it if it matched
              └─ ``queue`` callers already waiting, or ``wait`` ran out ──▶ Busy

The third branch is for one user's devices reconnecting together (after the broker
restarts, or a phone regains its network with six apps): the first check of that
password hashes, the others wait for its answer instead of queueing for slots of
their own and being told "busy" because the queue filled with copies of one check.

Hashing yields the processor: the hashes run on threads of their own at a low CPU
priority (nice 10; Linux gives each thread its own). A core busy hashing still serves
a chat message the moment one arrives; sign-ins take longer when the machine is full,
chat does not. Not nice 19: against ten busy threads of normal priority a hash would
get 0.3% of a core and time out, and a device that cannot sign in gets no messages
at all; at nice 10 it still gets about a tenth of its share. On two cores, the
embedded broker and the history API each hashing at full tilt left nothing for the
bridge: others' chat stalled for seconds.

The cache never holds a password: the key has an HMAC of it under a key drawn at
random when the process starts, which dies with the process. The stored hash is read
fresh from the database by the caller at every sign-in (an indexed lookup), so a
password change, a disable or a delete changes the key (or refuses before it is
looked at) and an entry made with the old password matches nothing any more. Only
successes are cached: a wrong password always costs a hash, under the same bound.

The rate: a cached sign-in costs no hash but still a session, a token, a database
lookup. Forty clients signing in over and over made 230 of them a second and held
other users' chat at p99 1.7 s on the embedded stack; the process admits at most
``rate`` sign-ins a second and tells the rest to come back (a client told "busy"
backs off). A storm of reconnecting devices is spread out rather than served at once.

One instance per process (:func:`process_checks`), shared by every caller in it: the
API's token endpoint and password change, the embedded broker's sign-in gate.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Final

from cachetools import TTLCache
from token_bucket import MemoryStorage

#: Seconds a verified (username, hash, password) is trusted without argon2.
CACHE_SECONDS: Final = 60.0
#: Entries kept at most (each is about 200 bytes).
CACHE_ENTRIES: Final = 10_000
#: Callers that may wait for a hashing slot, per slot; more are refused at once.
WAITING_PER_SLOT: Final = 4
#: Sign-ins a second one process admits, and how many at once (a token bucket).
SIGN_INS_PER_SECOND: Final = 20.0
SIGN_IN_BURST: Final = 50
#: Seconds a caller waits for a slot before it is refused: a backstop (the queue
#: bound refuses first), long enough for a storm of distinct users on a busy machine.
WAIT_SECONDS: Final = 30.0
#: The nice value of the hashing threads (0 is normal, 19 the lowest).
HASHING_NICE: Final = 10


class Busy(Exception):
    """Every hashing slot is taken and the queue is full: try again shortly."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many sign-ins at once; try again in {retry_after} s")
        self.retry_after = retry_after


class PasswordChecks:
    """A bound on concurrent password hashes, and a cache of verified credentials.

    Thread-safe: callers run it from worker threads (argon2 releases the GIL).
    """

    def __init__(
        self,
        *,
        concurrency: int | None = None,
        queue: int | None = None,
        wait: float = WAIT_SECONDS,
        cache_seconds: float = CACHE_SECONDS,
        cache_entries: int = CACHE_ENTRIES,
        rate: float = SIGN_INS_PER_SECOND,
        burst: int = SIGN_IN_BURST,
    ) -> None:
        # Half the cores: hashing at full tilt must leave the others' work a core.
        self.concurrency = concurrency or max(1, (os.cpu_count() or 1) // 2)
        self.queue = queue if queue is not None else WAITING_PER_SLOT * self.concurrency
        self.wait = wait
        self.rate, self.burst = rate, burst
        self._admissions = MemoryStorage()
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._hashers = ThreadPoolExecutor(
            self.concurrency, thread_name_prefix="argon2", initializer=_yield_the_processor
        )
        self._lock = threading.Lock()
        self._waiting = 0
        self._key = secrets.token_bytes(32)
        self._verified: TTLCache[tuple[str, str, bytes], bool] = TTLCache(
            cache_entries, cache_seconds
        )
        self._in_flight: dict[tuple[str, str, bytes], _Flight] = {}
        #: Hashes run since the start, and the most that ever ran at once.
        self.hashes = 0
        #: Checks answered by another thread's identical hash.
        self.shared = 0
        self.peak_hashing = 0
        self._hashing = 0

    def verify(
        self,
        username: str,
        stored_hash: str,
        password: str,
        matches: Callable[[str, str], bool],
        *,
        cache: bool = True,
    ) -> bool:
        """Whether ``password`` matches ``stored_hash``, hashing only when needed.

        Args:
            matches: the slow check, ``matches(stored_hash, password)`` (argon2).
            cache: False for a hash that must not be remembered (a disabled account,
                the dummy hash of an unknown user).

        Raises:
            Busy: over ``rate`` sign-ins a second, no hashing slot within ``wait``
                seconds, or too many waiting.
        """
        key = (username, stored_hash, self._mac(password))
        with self._lock:
            # Only what is admitted is counted: a caller refused for want of a slot
            # has not used up the rate.
            self._admissions.replenish("sign-ins", self.rate, self.burst)
            if self._admissions.get_token_count("sign-ins") < 1:
                raise Busy(1)
            if cache and self._verified.get(key, False):
                self._admissions.consume("sign-ins", 1)
                return True
            flight = self._in_flight.get(key)
            leading = flight is None
            if flight is None:
                flight = self._in_flight[key] = _Flight()
        if not leading:
            return self._follow(flight)
        try:
            with self._slot():
                with self._lock:
                    self._admissions.consume("sign-ins", 1)
                flight.ok = self._hashers.submit(matches, stored_hash, password).result()
            if flight.ok and cache:
                with self._lock:
                    self._verified[key] = True
            return flight.ok
        finally:
            with self._lock:
                del self._in_flight[key]
            flight.done.set()

    def _follow(self, flight: _Flight) -> bool:
        """The answer of the identical check another thread is running.

        The same username, stored hash and password give the same answer, right or
        wrong, so nothing is learnt by sharing it. Should the leader end without one
        (it was told "busy", or failed), so does the follower.
        """
        if not flight.done.wait(self.wait) or flight.ok is None:
            raise Busy(1)
        with self._lock:
            self._admissions.consume("sign-ins", 1)
            self.shared += 1
        return flight.ok

    def _mac(self, password: str) -> bytes:
        return hmac.new(self._key, password.encode(), hashlib.sha256).digest()

    def _slot(self) -> _Slot:
        with self._lock:
            if self._waiting >= self.queue:
                raise Busy(1)
            self._waiting += 1
        try:
            acquired = self._slots.acquire(timeout=self.wait)
        finally:
            with self._lock:
                self._waiting -= 1
        if not acquired:
            raise Busy(max(1, round(self.wait)))
        return _Slot(self)

    def _enter(self) -> None:
        with self._lock:
            self._hashing += 1
            self.hashes += 1
            self.peak_hashing = max(self.peak_hashing, self._hashing)

    def _leave(self) -> None:
        with self._lock:
            self._hashing -= 1
        self._slots.release()


def _yield_the_processor() -> None:
    """Run this thread at the lowest priority (Linux: nice is per thread).

    Elsewhere ``setpriority`` would renice the whole process, which is worse than
    nothing: there the hashes keep the default priority.
    """
    if sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        # Never raise the priority of a process started at a lower one (nor could we
        # without CAP_SYS_NICE).
        nice = max(HASHING_NICE, os.getpriority(os.PRIO_PROCESS, thread))
        os.setpriority(os.PRIO_PROCESS, thread, nice)


class _Flight:
    """One password hash under way, and its answer for identical checks that wait."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok: bool | None = None


class _Slot:
    """A hashing slot already acquired; released on leaving the ``with`` block."""

    def __init__(self, checks: PasswordChecks) -> None:
        self._checks = checks

    def __enter__(self) -> None:
        self._checks._enter()

    def __exit__(self, *exc: object) -> None:
        self._checks._leave()


@lru_cache(maxsize=1)
def process_checks() -> PasswordChecks:
    """The process's one instance: its bound only holds if every caller shares it."""
    return PasswordChecks()


def configure(*, rate: float, burst: int) -> PasswordChecks:
    """Set the process's sign-in rate from a daemon's settings, at its start."""
    checks = process_checks()
    with checks._lock:
        checks.rate, checks.burst = rate, burst
    return checks
