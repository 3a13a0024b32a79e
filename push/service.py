"""The push daemon: wakes a device whose user has not received a message in time.

::

    database ──scan──▶ push_state ──decide (grace over, not delivered)──▶ push_outbox
    push_outbox ──claim (lease)──▶ Sender.send ──▶ sent │ gone (404/410: unsubscribe)
                                       │               │ failed (retries spent)
                                       └─ TryAgain (429, 5xx, network): tenacity,
                                          honouring Retry-After

Every step is a short transaction of ``store.push``; several push daemons share the
work without talking to each other. The decision is stored before anything is sent,
so a daemon killed in between leaves the push to the next daemon (or itself,
restarted), which sends it once.

Shape after uvicorn's server: ``run()`` → ``startup()`` → ``main_loop()`` →
``shutdown()``; a signal only sets a flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import Counter
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from core.daemon import PUSH_READY_LOG, Service
from store import make_engine, reading
from store import push as outbox
from store.db import relaxed, revisions

from .config import PushSettings
from .senders import (
    Delivery,
    Notification,
    Sender,
    TryAgain,
    WebPushSender,
    application_server_key,
    load_vapid,
)

log = logging.getLogger(__name__)


class SchemaNotReady(RuntimeError):
    """The database is not migrated to the revision this daemon expects."""


class PushDaemon(Service):
    def __init__(
        self,
        settings: PushSettings,
        engine: Engine | None = None,
        senders: list[Sender] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        # Relaxed commits (SQLite: no fsync of its own; the bridge's next commit flushes
        # them): a power cut loses the newest decisions and outcomes together, in
        # order, so the scan reads those messages again and a push whose "sent" was
        # lost is sent again. Never a message lost; at worst a push twice.
        self.engine = relaxed(engine or make_engine(settings.database_url))
        self._reading = reading(self.engine)
        self._senders: dict[str, Sender] = {}
        for sender in senders or []:
            self._add(sender)
        self._in_flight: set[asyncio.Task[None]] = set()
        #: Outcomes of pushes (sent, gone, failed) and of decisions (skipped: acked
        #: in time), logged at shutdown.
        self.counts: Counter[str] = Counter()
        self._decision_rounds = 0
        #: Pushes sent (or given up) whose outcome is not stored yet.
        self._finished: list[tuple[outbox.Claimed, outbox.Outcome, str]] = []

    def _add(self, sender: Sender) -> None:
        for channel in sender.channels:
            self._senders[channel] = sender

    async def startup(self) -> None:
        await asyncio.to_thread(self._check_schema)
        vapid = await asyncio.to_thread(load_vapid, self.settings.vapid_key_file)
        await asyncio.to_thread(outbox.publish_key, self.engine, application_server_key(vapid))
        if not self._senders:
            s = self.settings
            self._add(
                WebPushSender(
                    vapid,
                    s.vapid_subject,
                    s.allowlist,
                    ttl=s.ttl,
                    urgency=s.urgency,
                    timeout=s.request_timeout,
                    max_response_bytes=s.max_response_bytes,
                    ca_file=s.ca_file,
                    connections=s.concurrency,
                )
            )
        log.info("%s (grace %.1f s)", PUSH_READY_LOG, self.settings.grace)

    async def main_loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = await self._round()
            except (OperationalError, DBAPIError) as exc:
                log.warning("database unavailable: %s", str(exc).splitlines()[0])
                busy = False
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.settings.poll)

    async def shutdown(self) -> None:
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=self.settings.shutdown_timeout)
            for task in pending:
                task.cancel()
        try:
            await self._store_outcomes()
        except (OperationalError, DBAPIError) as exc:
            log.warning("shutdown: outcomes not stored: %s", str(exc).splitlines()[0])
            if pending:
                log.warning(
                    "shutdown: %d pushes in flight abandoned; their lease ends and "
                    "another push daemon sends them",
                    len(pending),
                )
        for sender in set(self._senders.values()):
            await sender.close()
        self.engine.dispose()
        log.info("push daemon stopped: %s", dict(sorted(self.counts.items())) or "nothing done")

    async def _round(self) -> bool:
        """One scan, one decision and one claim; True if any of them found work."""
        s = self.settings
        stored = await self._store_outcomes()
        todo = await asyncio.to_thread(outbox.work, self._reading)
        scanned = pushed = skipped = 0
        if todo.scan:
            scanned = await asyncio.to_thread(
                outbox.scan,
                self.engine,
                grace=timedelta(seconds=s.grace),
                collapse=timedelta(seconds=s.collapse),
                limit=s.batch,
                gap_timeout=timedelta(seconds=s.gap_timeout),
            )
        if todo.scan or todo.decide:
            pushed, skipped = await asyncio.to_thread(outbox.decide, self.engine, limit=s.batch)
            self.counts["acked in time"] += skipped
        if pushed and s.crash_after_decisions is not None:
            self._decision_rounds += 1
            if self._decision_rounds >= s.crash_after_decisions:
                log.warning("crash_after_decisions reached: SIGKILL")
                os.kill(os.getpid(), signal.SIGKILL)
        room = s.concurrency - len(self._in_flight)
        claimed = []
        if room > 0 and (todo.claim or pushed):
            claimed = await asyncio.to_thread(
                outbox.claim,
                self.engine,
                lease=timedelta(seconds=s.lease),
                limit=min(room, s.batch),
            )
        for push in claimed:
            task = asyncio.create_task(self._deliver(push), name=f"push-{push.pk}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return bool(stored or scanned or pushed or skipped or claimed)

    async def _deliver(self, push: outbox.Claimed) -> None:
        """Send one push, retrying what may pass; its outcome stored, counted and
        logged once."""
        s = self.settings
        notification = Notification(
            push.conversation, push.sender, push.seq, push.count, push.preview, push.event
        )
        sender = self._senders.get(push.channel)
        tries = 0
        if sender is None:
            delivery = Delivery("failed", f"no sender for channel {push.channel!r}")
        else:
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(TryAgain),
                    wait=self._wait,
                    stop=stop_after_attempt(s.max_attempts) | stop_after_delay(s.lease / 2),
                    reraise=True,
                ):
                    with attempt:
                        tries += 1
                        delivery = await sender.send(push, notification)
            except TryAgain as exc:
                delivery = Delivery("failed", f"gave up after {tries} tries: {exc}")
        # Stored with the next round's others: one transaction for many outcomes.
        self._finished.append((push, delivery.outcome, delivery.detail))
        self.counts[delivery.outcome] += 1
        level = logging.INFO if delivery.outcome == "sent" else logging.WARNING
        log.log(
            level,
            "push %d to %s/%s (%s, %d new): %s %s after %d tries",
            push.pk,
            push.user,
            push.device,
            push.conversation,
            push.count,
            delivery.outcome,
            delivery.detail,
            tries,
        )

    async def _store_outcomes(self) -> bool:
        done, self._finished = self._finished, []
        try:
            await asyncio.to_thread(outbox.finish, self.engine, done)
        except (OperationalError, DBAPIError):
            # Kept for the next round; if this daemon dies first, the lease ends and
            # the pushes are sent again (at least once).
            self._finished = done + self._finished
            raise
        return bool(done)

    def _wait(self, state: RetryCallState) -> float:
        """The service's ``Retry-After`` when it gave one (capped), else jittered
        exponential backoff."""
        cap = self.settings.max_retry_after
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, TryAgain) and error.retry_after is not None:
            return min(error.retry_after, cap)
        return float(wait_random_exponential(multiplier=0.5, max=max(cap, 0.5))(state))

    def _check_schema(self) -> None:
        current, head = revisions(self.engine)
        if current != head:
            raise SchemaNotReady(
                f"database is at revision {current}, this push daemon needs {head}: "
                "run `mqchat db upgrade` first"
            )
