"""Sign-ins, counted per account and per client address.

Failures are counted per account and per address: a guesser is stopped after a few
tries whichever account or address they use. Successes are counted per account with
a far larger allowance (``sign_ins_per_user``): signing in over and over in a loop is
refused too, since each success costs a database write. The check happens before the
password is hashed, so a throttled client also stops costing argon2 time. Counts are in
memory, per API process.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

from anyio import CapacityLimiter, to_thread
from sqlalchemy import Engine
from sqlmodel import Session

from core.throttle import Throttle
from store import accounts, signin

from .config import ApiSettings
from .errors import Throttled
from .observe import ApiMetrics

T = TypeVar("T")


def _verify(engine: Engine, username: str, password: str) -> bool:
    with Session(engine) as session:
        return accounts.verify(session, username, password)


class SignInGuard:
    def __init__(self, settings: ApiSettings, metrics: ApiMetrics | None = None) -> None:
        self._metrics = metrics
        self._users = Throttle(settings.login_failures_per_user)
        self._sources = Throttle(settings.login_failures_per_source)
        self._sign_ins = Throttle(settings.sign_ins_per_user)
        self._threads = CapacityLimiter(settings.sign_in_threads)
        self._queue = settings.sign_in_threads * signin.WAITING_PER_SLOT

    async def run(self, sign_in: Callable[[], T]) -> T:
        """``sign_in()`` on a worker thread, at most ``sign_in_threads`` at once.

        Raises:
            signin.Busy: as many sign-ins are already waiting for a thread as
                ``store.signin`` lets wait per hashing slot, times the threads.
        """
        if self._threads.statistics().tasks_waiting >= self._queue:
            raise signin.Busy(1)
        return await to_thread.run_sync(sign_in, limiter=self._threads)

    async def verify(self, engine: Engine, username: str, password: str) -> bool:
        """Whether the password is right for the enabled account, checked as
        :meth:`run` runs a sign-in (``store.accounts.verify``)."""
        return await self.run(partial(_verify, engine, username, password))

    def check(self, username: str | None, source: str) -> None:
        """Refuse before trying a password if either count is full.

        Raises:
            Throttled: ``rate_limited`` (429) with the seconds to wait.
        """
        waits = []
        if not self._sources.allowed("source", source):
            waits.append(self._sources.retry_after("source", source))
        if username is not None and not self._users.allowed("user", username):
            waits.append(self._users.retry_after("user", username))
        if waits:
            wait = max(waits)
            self._throttled("failures")
            raise Throttled(f"too many failed sign-ins; try again in {wait} s", wait)
        if username is not None and not self._sign_ins.allowed("user", username):
            wait = self._sign_ins.retry_after("user", username)
            self._throttled("sign_ins")
            raise Throttled(f"too many sign-ins for this account; try again in {wait} s", wait)

    def succeeded(self, username: str) -> None:
        """A token was issued to ``username``."""
        self._sign_ins.hit("user", username)
        if self._metrics is not None:
            self._metrics.tokens_issued.inc()

    def _throttled(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.signin_throttles.labels(reason).inc()

    def failed(self, username: str | None, source: str) -> None:
        if self._metrics is not None:
            self._metrics.signin_failures.inc()
        self._sources.hit("source", source)
        if username is not None:
            self._users.hit("user", username)
