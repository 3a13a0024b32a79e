"""The bridge daemon: uplinks in, durable ordered deliveries and receipts out.

::

    broker ──up/msg──▶ queue ──batch──▶ decode ─┬─ bad ──▶ down/error ─────────────┐
          ──up/group─▶                          └─ ok ──▶ persist_batch (COMMIT)   │
                                                     or apply_op (COMMIT)          │
                                                           ├─▶ down/msg to members │
                                                           └─▶ down/receipt sent   │
                      ack uplinks ◀── all those PUBACKs ◀──────────────────────────┘

A group change (``up/group``) is stored like a message, as an event with the next seq
of its conversation, and published the same way to every member (the one writer of
a conversation's timeline is the bridge, so events and messages share one order).
Messages and changes of one batch are stored in arrival order: a run of messages
in one write, each change in a transaction of its own.

Acks move cursors (``store.cursors``): in a 1:1 conversation the other member is
told each move; in a group the moves of one batch are summed up per message sender
and each sender gets one aggregate receipt ("read by k of n") per group and batch,
which is what bounds a receipt storm in a 1,024-member group.

Persist before deliver: nothing is published before its commit, and an uplink is
acknowledged to the broker only after the broker has acknowledged everything
published for it. A crash anywhere means the broker redelivers the uplink, dedupe
finds the stored message, and it is published again with the same seq.

Big fan-outs go in a lane of their own (``_deliver``): a group message's hundreds of
publishes leave in chunks between which the event loop serves everything else, and
small deliveries, 1:1 messages, receipts, errors, pass them, except those of a
conversation with publishes still waiting in the lane, which queue behind its own.

Shape after uvicorn's server: ``run()`` → ``startup()`` → ``main_loop()`` →
``shutdown()``; a signal only sets a flag.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from cachetools import TTLCache
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

import protocol
from core.daemon import BRIDGE_READY_LOG, Service
from core.metrics import MetricsServer, broker_check, database_check, new_registry
from core.mqtt import ConnectRefused, Incoming, LinkConfig, MqttLink
from protocol import errors, topics
from store import backlog, conversations, make_engine, presence
from store.cursors import AckOutcome, advance_batch
from store.db import revisions
from store.groups import apply_op
from store.messages import DirectConversations, GroupMembers, Outcome, persist_batch
from store.types import utcnow

from .amqp_source import AmqpSource
from .config import BridgeSettings
from .faults import CrashHook
from .metrics import BACKLOG_AGES, BridgeMetrics
from .ratelimit import MessageRate

log = logging.getLogger(__name__)

#: Seconds between two "typing" events relayed for one sender and conversation.
TYPING_WINDOW = 3.0
#: Refusals remembered per instance, and for how long: far longer than any resend of
#: the SDK's (at most 8 x resend_after apart) stays in flight.
REFUSALS_KEPT = 100_000
REFUSALS_SECONDS = 600.0
#: Devices remembered as sent a presence snapshot, and for how long.
SNAPSHOTS_KEPT = 1_000_000
SNAPSHOT_SECONDS = 3600.0
#: Contacts' states in one ``down/presence`` (about 80 bytes each): far below every
#: broker's packet limit however many contacts a user has.
PRESENCE_CHUNK = 100
#: The uplink kinds counted by ``MQCHAT_BRIDGE_UPLINK_RATE``, each on its own.
_UPLINK_KINDS: dict[type, str] = {
    protocol.UpAck: "ack",
    protocol.UpTyping: "typing",
    protocol.UpPresence: "presence",
    protocol.UpGroup: "group",
}
#: Uplink kinds as ``mqchat_bridge_uplinks_total`` counts them.
_COUNTED_KINDS: dict[type, str] = _UPLINK_KINDS | {protocol.UpMessage: "msg"}
#: Conversations whose newest commit is remembered, to time its first delivered ack.
COMMITS_KEPT = 100_000
#: A conversation with more publishes than this in one batch (a group message to
#: more members) goes to the fan-out lane, which publishes this many between turns
#: of the event loop. 256 publishes in one go held a 1:1 message behind them for
#: 13 ms of the bridge's CPU.
FAN_OUT_CHUNK = 32

T = TypeVar("T")
R = TypeVar("R")


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, ConnectRefused) and exc.unavailable


class SchemaNotReady(RuntimeError):
    """The database is not migrated to the revision this bridge expects."""


@dataclass(frozen=True, slots=True)
class _Publish:
    topic: str
    payload: bytes
    retain: bool = False
    #: The conversation it belongs to (messages, events, receipts), whose order the
    #: fan-out lane keeps; None for what belongs to none (errors, presence).
    conversation: str | None = None


@dataclass(slots=True)
class _Batch:
    """One batch's uplinks sorted by kind, and what to publish for them.

    ``_decode`` fills it, ``_store`` adds what the database turns decide, and
    ``_deliver`` publishes ``publishes`` before acknowledging ``uplinks``.
    """

    uplinks: Sequence[Incoming]
    publishes: list[_Publish] = field(default_factory=list)
    #: Messages and group changes, in arrival order.
    to_store: list[tuple[str, protocol.UpMessage | protocol.UpGroup]] = field(default_factory=list)
    #: When each of ``to_store`` arrived (``Incoming.arrived``).
    arrivals: list[float] = field(default_factory=list)
    acks: list[tuple[str, protocol.UpAck]] = field(default_factory=list)
    presences: list[tuple[str, protocol.UpPresence]] = field(default_factory=list)
    typing: list[tuple[str, protocol.UpTyping]] = field(default_factory=list)


class Bridge(Service):
    def __init__(self, settings: BridgeSettings, engine: Engine | None = None) -> None:
        super().__init__()
        self.settings = settings
        # No pool pre-ping: every database call here retries a lost connection.
        self.engine = engine or make_engine(settings.database_url, pool_pre_ping=False)
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue()
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self.link = MqttLink(
            LinkConfig(
                host=settings.mqtt_host,
                port=settings.mqtt_port,
                other_addresses=tuple(settings.mqtt_other_nodes),
                username=settings.username,
                password=settings.password.get_secret_value(),
                client_id=settings.client_id,
                clean_session=False,
                keepalive=settings.keepalive,
                manual_ack=True,
            ),
            on_message=self._queue.put_nowait,
            on_connect=self._on_connect,
        )
        #: RabbitMQ: the uplinks come from this instance's queues, not the MQTT link.
        self.source: AmqpSource | None = None
        if settings.amqp_addresses:
            self.source = AmqpSource(
                settings.amqp_nodes,
                settings.username,
                settings.password.get_secret_value(),
                queues=settings.amqp_queues,
                partitions=settings.partitions,
                partition=settings.partition,
                prefetch=2 * settings.max_batch,
                deliver=self._queue.put_nowait,
                heartbeat=settings.keepalive,
            )
        self.handled = 0
        #: (user, device) sent a snapshot of its contacts' presence lately. A device
        #: gets one when it comes online, and again on its next word after an hour or
        #: after this bridge reconnected (a restarted broker may have lost what it
        #: queued), so a device whose offline was never recorded is not left stale.
        self._snapshots: TTLCache[tuple[str, str], bool] = TTLCache(
            SNAPSHOTS_KEPT, SNAPSHOT_SECONDS
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._backlog: asyncio.Task[None] | None = None
        self._rate = MessageRate(settings.message_rate)
        #: (sender, conversation) -> (when, typing) of the last typing event relayed.
        self._typing_sent: dict[tuple[str, str], tuple[float, bool]] = {}
        self._crash = CrashHook(settings.crash_at)  # test only, see bridge/faults.py
        self._persist = functools.partial(
            persist_batch, directs=DirectConversations(), groups=GroupMembers()
        )
        self._advance = functools.partial(advance_batch, max_devices=settings.max_devices)
        self._announce = functools.partial(presence.update_batch, max_devices=settings.max_devices)
        self._uplink_rates = {
            kind: MessageRate(settings.uplink_rate) for kind in _UPLINK_KINDS.values()
        }
        #: Conversations' members as of their ``members_seq``, for relaying typing:
        #: one key lookup per relayed event (at most one per window per sender and
        #: conversation), and a removal made through any instance holds at once.
        self._typing_members = GroupMembers(limit=100_000)
        #: (sender, id) -> the refusal of a message or group change: a resend of the
        #: same id gets the same answer, not a second chance. Without it a resend
        #: already on its way when the refusal came (the SDK resends until answered)
        #: was stored once the condition changed (the sender added to the group), after
        #: the app had been told "refused". Per instance and in memory: every uplink of
        #: a sender comes to the same instance, and a restart forgets.
        self._refused: TTLCache[tuple[str, str], errors.ProtocolError] = TTLCache(
            REFUSALS_KEPT, REFUSALS_SECONDS
        )
        #: Database turns taken (logged at shutdown; tests read it to show that
        #: refused uplinks cost none).
        self.database_turns = 0
        self.registry = new_registry()
        self.metrics = BridgeMetrics(
            self.registry,
            queue_depth=self._queue.qsize,
            broker_connected=lambda: self.link.is_connected,
            partitions=settings.partitions,
        )
        self.metrics_server = MetricsServer(
            settings.metrics_addr,
            self.registry,
            {
                "broker": broker_check(lambda: self.link.is_connected),
                "database": database_check(self.engine),
            },
        )
        #: conversation -> (seq, monotonic commit time, sender) of its newest message
        #: stored here, for ``mqchat_commit_to_delivered_seconds``: one dict write per
        #: message (a per-message TTL cache cost 6 µs, 4% of the bridge's budget).
        self._commits: dict[str, tuple[int, float, str]] = {}
        #: The fan-out lane: publishes waiting their chunk, in order, each with the
        #: future its batch's acknowledgement waits for; and per conversation how
        #: many of them it has there (what else of it must queue behind them).
        self._fan_out: deque[tuple[_Publish, asyncio.Future[None]]] = deque()
        self._behind: Counter[str] = Counter()
        self._fan_out_task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        await asyncio.to_thread(self._check_schema)
        # Before the broker: a supervisor sees "alive, not ready" while it connects.
        await self.metrics_server.start()
        # The broker may still be starting (``mqchat up`` starts both at once).
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(OSError) | retry_if_exception(_unavailable),
            wait=wait_random_exponential(multiplier=0.05, max=2),
            stop=stop_after_delay(self.settings.startup_timeout),
            reraise=True,
        ):
            with attempt:
                await self.link.connect()
        if self.source is not None:
            await self.source.start(self.settings.startup_timeout)
        else:
            await self.link.subscribe(topics.ALL_UPLINKS, qos=1)
        self._sweeper = asyncio.create_task(self._sweep_presence(), name="presence-sweeper")
        self._backlog = asyncio.create_task(self._count_backlog(), name="backlog-counter")
        log.info(
            "bridge %s %s on %s:%s",
            self.settings.client_id,
            BRIDGE_READY_LOG,
            self.settings.mqtt_host,
            self.settings.mqtt_port,
        )

    async def main_loop(self) -> None:
        """Take batches; store one while the one stored before it is published.

        The database turns stay one at a time and in arrival order (seqs, dedupe);
        only publishing batch N, which is main-thread work, overlaps storing batch
        N+1, which is mostly waiting for the database. Batch N is published before
        batch N+1 is stored, so deliveries keep the order of the commits.
        """
        stop = asyncio.create_task(self._stop.wait())
        stored: _Batch | None = None
        try:
            while not self._stop.is_set():
                if stored is not None and self._queue.empty():
                    self._deliver(stored)  # nothing to overlap with: publish now
                    stored = None
                get = asyncio.create_task(self._queue.get())
                done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                batch = [get.result()]
                # Group commit: whatever queued up while the last batch committed.
                while len(batch) < self.settings.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                work = self._decode(batch)
                storing = asyncio.create_task(self._store(work))
                if stored is not None:
                    self._deliver(stored)
                    stored = None
                await storing
                stored = work
        finally:
            stop.cancel()
            if stored is not None:
                self._deliver(stored)  # committed: publish it before stopping

    async def shutdown(self) -> None:
        for task in (self._sweeper, self._backlog):
            if task is not None:
                task.cancel()
        if self._ack_tasks:
            _, pending = await asyncio.wait(self._ack_tasks, timeout=self.settings.shutdown_timeout)
            if pending:
                log.warning(
                    "shutdown: %d batches not acknowledged; the broker will redeliver them",
                    len(pending),
                )
        left = self._queue.qsize()
        if left:
            log.info("shutdown: %d uplinks left unacknowledged for redelivery", left)
        if self.source is not None:
            await self.source.close()
        await self.link.close()
        await self.metrics_server.stop()
        self.engine.dispose()
        log.info(
            "bridge %s stopped after handling %d uplinks in %d database turns",
            self.settings.client_id,
            self.handled,
            self.database_turns,
        )

    # -- the pipeline -------------------------------------------------------------

    def _decode(self, batch: Sequence[Incoming]) -> _Batch:
        """Sort a batch's uplinks by kind; refusals become ``down/error`` publishes."""
        work = _Batch(batch)
        self.metrics.batch_size.observe(len(batch))
        kinds: dict[type, int] = {}
        invalid = 0
        for incoming in batch:
            if not self._mine(incoming.topic):
                continue  # another instance's sender: acknowledged with the batch
            self.handled += 1
            try:
                decoded = protocol.decode(
                    incoming.topic,
                    incoming.payload,
                    max_payload_bytes=self.settings.max_payload_bytes,
                    max_body_chars=self.settings.max_body_chars,
                )
            except errors.ProtocolError as exc:
                invalid += 1
                work.publishes.extend(self._refusal(incoming.topic, exc))
                continue
            kind = type(decoded.payload)
            kinds[kind] = kinds.get(kind, 0) + 1
            refusal = self._over_rate(decoded.sender, decoded.payload)
            if refusal is not None:
                work.publishes.append(self._error(decoded.sender, refusal))
                continue
            if isinstance(decoded.payload, protocol.UpMessage | protocol.UpGroup):
                work.to_store.append((decoded.sender, decoded.payload))
                work.arrivals.append(incoming.arrived)
            elif isinstance(decoded.payload, protocol.UpAck):
                work.acks.append((decoded.sender, decoded.payload))
            elif isinstance(decoded.payload, protocol.UpPresence):
                work.presences.append((decoded.sender, decoded.payload))
            elif isinstance(decoded.payload, protocol.UpTyping):
                work.typing.append((decoded.sender, decoded.payload))
        # Once per batch and kind, not per uplink: the counters take a lock each.
        for kind, count in kinds.items():
            self.metrics.uplink_kinds[_COUNTED_KINDS[kind]].inc(count)
        if invalid:
            self.metrics.uplink_kinds["invalid"].inc(invalid)
        return work

    def _over_rate(self, sender: str, uplink: protocol.Uplink) -> errors.ProtocolError | None:
        """``rate_limited`` if ``sender`` sent too many uplinks of this kind, else None.

        Every kind is counted, before any database work, so a flood of any of them is
        refused for the price of two numbers per sender and kind.
        """
        if isinstance(uplink, protocol.UpMessage):
            if self._rate.allow(sender):
                return None
            return errors.ProtocolError(
                errors.RATE_LIMITED,
                f"over {self.settings.message_rate} messages; send it again later",
                id=uplink.id,
            )
        kind = _UPLINK_KINDS[type(uplink)]
        if self._uplink_rates[kind].allow(sender):
            return None
        return errors.ProtocolError(
            errors.RATE_LIMITED,
            f"over {self.settings.uplink_rate} {kind} uplinks; dropped",
            id=uplink.id if isinstance(uplink, protocol.UpGroup) else None,
        )

    async def _store(self, work: _Batch) -> None:
        """The batch's database turns, in order; adds what to publish for it."""
        publishes = work.publishes
        fresh = []
        arrivals = []
        for (sender, uplink), arrived in zip(work.to_store, work.arrivals, strict=True):
            refusal = self._refused.get((sender, uplink.id))
            if refusal is not None:
                publishes.append(self._error(sender, refusal))
            else:
                fresh.append((sender, uplink))
                arrivals.append(arrived)
        if fresh:
            self._crash.reach("before_commit")
            outcomes = await self._store_in_order(fresh)
            self._crash.reach("after_commit")
            self._count_stored(outcomes, arrivals)
            for (sender, uplink), outcome in zip(fresh, outcomes, strict=True):
                # id_reused: the id names a stored message, which stays its answer.
                if outcome.error is not None and outcome.error.code != errors.ID_REUSED:
                    self._refused[(sender, uplink.id)] = outcome.error
                publishes.extend(self._route(sender, outcome))
        if work.acks:
            # After the messages of the same batch, which an ack may refer to.
            ack_outcomes = await self._with_database("receipts", self._advance, work.acks)
            self._time_deliveries(ack_outcomes)
            for (sender, _), ack_outcome in zip(work.acks, ack_outcomes, strict=True):
                publishes.extend(self._receipts(sender, ack_outcome))
        if work.presences:
            states = await self._with_database("presence updates", self._announce, work.presences)
            publishes.extend(self._error(s.user, s.error) for s in states if s.error is not None)
            snapshot_for = set()
            for state, (_, word) in zip(states, work.presences, strict=True):
                if state.error is not None or word.state != "online":
                    continue
                if state.came_online or (state.user, word.device) not in self._snapshots:
                    self._snapshots[(state.user, word.device)] = True
                    snapshot_for.add(state.user)
            ok = [s for s in states if s.error is None]
            publishes.extend(await self._presence(ok, snapshot_for))
        for sender, event in work.typing:
            # Ephemeral: QoS 0, never stored, and nothing waits for it.
            await self._relay_typing(sender, event, publishes)

    async def _store_in_order(
        self, uplinks: Sequence[tuple[str, protocol.UpMessage | protocol.UpGroup]]
    ) -> list[Outcome]:
        """Messages and group changes in arrival order: a sender's "bye" before their
        leaving is stored, and their "welcome" after adding someone reaches them."""
        outcomes: list[Outcome] = []
        run: list[tuple[str, protocol.UpMessage]] = []
        for sender, uplink in uplinks:
            if isinstance(uplink, protocol.UpMessage):
                run.append((sender, uplink))
                continue
            if run:
                outcomes += await self._with_database("messages", self._persist, run)
                run = []
            outcomes += await self._with_database("group changes", self._apply, [(sender, uplink)])
        if run:
            outcomes += await self._with_database("messages", self._persist, run)
        return outcomes

    def _count_stored(self, outcomes: Sequence[Outcome], arrivals: Sequence[float]) -> None:
        """Count what a commit stored, and time each from its arrival."""
        committed = time.monotonic()
        stored = redelivered = 0
        observe = self.metrics.commit.observe
        for outcome, arrived in zip(outcomes, arrivals, strict=True):
            message = outcome.stored
            if message is None:
                continue
            if message.duplicate:
                redelivered += 1
                continue
            stored += 1
            observe(committed - arrived)
            self._commits[message.conversation] = (message.seq, committed, message.sender)
        if len(self._commits) > COMMITS_KEPT:
            self._commits.clear()  # a few deliveries go untimed; memory stays bounded
        if stored:
            self.metrics.stored.inc(stored)
        if redelivered:
            self.metrics.redeliveries.inc(redelivered)

    def _time_deliveries(self, outcomes: Sequence[AckOutcome]) -> None:
        """Time commit to first delivery of the newest message a delivered cursor passed.

        A member's delivered cursor moves on the first ack of any of its devices, so a
        move over a conversation's newest message is that message's first delivery to
        the member (the sender's own devices, which get it too, are not recipients).
        Only each conversation's newest message committed by this instance is timed:
        a sample, one dict lookup per cursor move, instead of bookkeeping per message.
        """
        now = time.monotonic()
        for outcome in outcomes:
            for change in outcome.changes:
                if change.kind != "delivered":
                    continue
                newest = self._commits.get(change.conversation)
                if newest is None:
                    continue
                seq, committed, sender = newest
                if change.before < seq <= change.seq and sender != change.user:
                    kind = "group" if change.group else "direct"
                    self.metrics.delivered_kinds[kind].observe(now - committed)

    def _apply(
        self, engine: Engine, changes: Sequence[tuple[str, protocol.UpGroup]]
    ) -> list[Outcome]:
        return [
            apply_op(engine, sender, op, self.settings.group_max_members) for sender, op in changes
        ]

    def _deliver(self, stored: _Batch) -> None:
        """Publish a stored batch; acknowledge its uplinks once the broker has it all.

        A conversation's publishes of this batch go to the fan-out lane if there are
        more than ``FAN_OUT_CHUNK`` of them or it already has some waiting there; the
        rest are published at once. Per conversation, the order of publishing is the
        order of the commits, as without the lane.
        """
        sizes = Counter(p.conversation for p in stored.publishes)
        futures = []
        for p in stored.publishes:
            c = p.conversation
            if c is not None and (sizes[c] > FAN_OUT_CHUNK or c in self._behind):
                futures.append(self._queue_fan_out(p, c))
            else:
                futures.append(self.link.publish(p.topic, p.payload, qos=1, retain=p.retain))
        if futures:
            self.metrics.published.inc(len(futures))
        task = asyncio.create_task(
            self._ack_when_published(futures, stored.uplinks, stored.arrivals)
        )
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    def _queue_fan_out(self, publish: _Publish, conversation: str) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fan_out.append((publish, done))
        self._behind[conversation] += 1
        if self._fan_out_task is None:
            self._fan_out_task = asyncio.create_task(self._publish_fan_out(), name="fan-out")
        return done

    async def _publish_fan_out(self) -> None:
        """Publish the lane ``FAN_OUT_CHUNK`` at a time, yielding to the event loop
        between chunks; ends when the lane is empty (``_queue_fan_out`` restarts it)."""
        try:
            while self._fan_out:
                for _ in range(min(FAN_OUT_CHUNK, len(self._fan_out))):
                    p, done = self._fan_out.popleft()
                    published = self.link.publish(p.topic, p.payload, qos=1, retain=p.retain)
                    published.add_done_callback(functools.partial(_settle, done))
                    assert p.conversation is not None
                    self._behind[p.conversation] -= 1
                    if not self._behind[p.conversation]:
                        del self._behind[p.conversation]
                await asyncio.sleep(0)
        finally:
            self._fan_out_task = None

    async def _with_database(
        self, what: str, write: Callable[[Engine, Sequence[T]], list[R]], items: Sequence[T]
    ) -> list[R]:
        """Run one batch write, retrying for as long as the database is unreachable.

        While it retries nothing is acknowledged, so the broker keeps the uplinks.
        """

        def report(state: RetryCallState) -> None:
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0
            log.warning(
                "database unavailable; holding %d uplinks, retrying in %.2f s: %s",
                len(items),
                delay,
                str(error).splitlines()[0] if error else "?",
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((OperationalError, DBAPIError)),
            wait=wait_random_exponential(multiplier=0.1, max=5),
            before_sleep=report,
            reraise=True,
        ):
            with attempt:
                self.database_turns += 1
                started = time.monotonic()
                result = await asyncio.to_thread(write, self.engine, items)
                took = time.monotonic() - started
                self.metrics.db_turn.labels(what).observe(took)
                if took > self.settings.slow_turn:
                    log.warning(
                        "slow database turn: %d %s took %.0f ms",
                        len(items),
                        what,
                        took * 1000,
                    )
                return result
        raise AssertionError("unreachable")

    def _route(self, sender: str, outcome: Outcome) -> list[_Publish]:
        if outcome.error is not None:
            return [self._error(sender, outcome.error)]
        stored = outcome.stored
        assert stored is not None
        message = protocol.encode(stored.down())
        receipt = protocol.encode(
            protocol.Receipt(
                status="sent",
                conversation=stored.conversation,
                seq=stored.seq,
                id=stored.client_id,
                by=stored.sender,
                at=utcnow(),
            )
        )
        conversation = stored.conversation
        out = [
            _Publish(topics.down_msg(member), message, conversation=conversation)
            for member in stored.members
        ]
        out.append(_Publish(topics.down_receipt(sender), receipt, conversation=conversation))
        return out

    async def _relay_typing(
        self, sender: str, event: protocol.UpTyping, errors_out: list[_Publish]
    ) -> None:
        key = (sender, event.conversation)
        now = time.monotonic()
        last = self._typing_sent.get(key)
        # At most one "typing" per window per sender and conversation; a "stopped"
        # always passes when the last word relayed was "typing".
        if event.typing and last is not None and last[1] and now - last[0] < TYPING_WINDOW:
            return
        if not event.typing and (last is None or not last[1]):
            return
        self.database_turns += 1
        try:
            members = await asyncio.to_thread(
                conversations.current_members_if_member,
                self.engine,
                event.conversation,
                sender,
                self._typing_members,
            )
        except (OperationalError, DBAPIError):
            return  # typing is not worth holding anything up for
        if members is None:
            errors_out.append(
                self._error(
                    sender,
                    errors.ProtocolError(
                        errors.UNKNOWN_CONVERSATION,
                        f"no conversation {event.conversation!r} of yours",
                    ),
                )
            )
            return
        if len(self._typing_sent) > 100_000:
            self._typing_sent.clear()
        self._typing_sent[key] = (now, event.typing)
        payload = protocol.encode(
            protocol.DownTyping(conversation=event.conversation, from_=sender, typing=event.typing)
        )
        for member in members:
            if member != sender:
                self.link.publish(topics.down(member, "typing"), payload, qos=0)

    def _mine(self, topic: str) -> bool:
        partitions = self.settings.partitions
        if partitions == 1 or self.source is not None:  # the broker partitioned them
            return True
        sender = topics.uplink_sender(topic)
        if sender is None:
            return self.settings.partition == 0  # malformed: one instance answers
        return zlib.crc32(sender.encode()) % partitions == self.settings.partition

    def _receipts(self, user: str, outcome: AckOutcome) -> list[_Publish]:
        if outcome.error is not None:
            return [self._error(user, outcome.error)]
        out = []
        for change in outcome.changes:
            payload = protocol.encode(
                protocol.Receipt(
                    status=change.kind,
                    conversation=change.conversation,
                    seq=change.seq,
                    by=change.user,
                    at=change.at,
                )
            )
            # Everyone else learns how far this member got (in a group, nobody: its
            # senders get the tallies below); for "read" the member's own devices
            # learn it too, so each clears its unread count.
            for member in change.members:
                if member != change.user or change.kind == "read":
                    out.append(
                        _Publish(
                            topics.down_receipt(member), payload, conversation=change.conversation
                        )
                    )
        for tally in outcome.tallies:
            aggregate = protocol.Receipt(
                status=tally.kind,
                conversation=tally.conversation,
                seq=tally.seq,
                by=tally.by,
                at=tally.at,
                delivered=tally.delivered,
                read=tally.read,
                members=tally.members,
            )
            out.append(
                _Publish(
                    topics.down_receipt(tally.sender),
                    protocol.encode(aggregate),
                    conversation=tally.conversation,
                )
            )
        return out

    async def _presence(
        self, states: Sequence[presence.UserPresence], snapshot_for: Collection[str] = ()
    ) -> list[_Publish]:
        """Each change to the changed user's contacts' ``down/presence``; each user in
        ``snapshot_for`` their contacts' current states. One message per recipient
        (and chunk), however many of their contacts changed in the batch."""
        latest = {state.user: state for state in states}  # the last word per user wins
        changed = [state for state in latest.values() if state.changed]
        if not changed and not snapshot_for:
            return []
        found = (
            await self._with_database(
                "presence fan-out",
                lambda engine, _: [
                    presence.audience(
                        engine,
                        [state.user for state in changed],
                        snapshot_for,
                        self.settings.presence_group_limit,
                        self.settings.presence_max_contacts,
                    )
                ],
                [None],
            )
        )[0]
        told: dict[str, list[protocol.ContactPresence]] = {}
        for state in changed:
            word = _contact(state.user, state.online, state.at)
            for contact in found.contacts[state.user]:
                told.setdefault(contact, []).append(word)
        out = []
        for user, words in told.items():
            out += _presence_publish(user, words, snapshot=False)
        for user in sorted(snapshot_for):
            words = [
                _contact(contact, *found.states[contact])
                for contact in found.contacts[user]
                if contact in found.states
            ]
            out += _presence_publish(user, words, snapshot=True)
        return out

    async def _sweep_presence(self) -> None:
        """Take offline the devices that stopped announcing themselves (lost wills)."""
        if self.settings.partition != 0:
            return  # one sweeper is enough
        ttl = self.settings.presence_ttl
        while True:
            await asyncio.sleep(min(ttl / 3, 30))
            silent_since = utcnow() - timedelta(seconds=ttl)
            try:
                gone = await asyncio.to_thread(presence.expire, self.engine, silent_since)
            except (OperationalError, DBAPIError) as exc:
                log.warning("presence sweep skipped: %s", str(exc).splitlines()[0])
                continue
            for p in await self._presence(gone):
                self.link.publish(p.topic, p.payload, qos=1)

    async def _count_backlog(self) -> None:
        """Count the undelivered backlog now and then: one bounded query per interval
        (``store.backlog``), never work per message."""
        if self.settings.partition != 0:
            return  # the count is of the whole database: one instance is enough
        ages = [timedelta(seconds=seconds) for _, seconds in BACKLOG_AGES]
        while True:
            try:
                counts = await asyncio.to_thread(backlog.undelivered, self.engine, utcnow(), ages)
                users, devices = await asyncio.to_thread(backlog.online, self.engine)
            except (OperationalError, DBAPIError) as exc:
                log.warning("backlog count skipped: %s", str(exc).splitlines()[0])
            else:
                for (label, _), count in zip(BACKLOG_AGES, counts, strict=True):
                    self.metrics.undelivered.labels(label).set(count)
                self.metrics.online_users.set(users)
                self.metrics.online_devices.set(devices)
                self.metrics.backlog_checked.set_to_current_time()
            await asyncio.sleep(self.settings.backlog_interval)

    def _on_connect(self, session_present: bool) -> None:
        self._snapshots.clear()

    def _refusal(self, topic: str, exc: errors.ProtocolError) -> list[_Publish]:
        sender = topics.uplink_sender(topic)
        if sender is None or not topics.is_valid_username(sender):
            log.warning("dropping uplink on %r: %s", topic, exc)
            self.metrics.refusals.labels(exc.code).inc()
            return []
        return [self._error(sender, exc)]

    def _error(self, user: str, exc: errors.ProtocolError) -> _Publish:
        self.metrics.refusals.labels(exc.code).inc()
        error = protocol.ErrorPayload(id=exc.id, code=exc.code, detail=exc.detail)
        return _Publish(topics.down_error(user), protocol.encode(error))

    async def _ack_when_published(
        self,
        futures: list[asyncio.Future[None]],
        batch: Sequence[Incoming],
        arrivals: Sequence[float],
    ) -> None:
        if futures:
            await asyncio.gather(*futures)
            self._crash.reach("after_publish")
        now = time.monotonic()
        observe = self.metrics.puback.observe
        for arrived in arrivals:
            observe(now - arrived)
        for incoming in batch:
            if self.source is not None:
                await self.source.ack(incoming)
            else:
                self.link.ack(incoming)

    def _check_schema(self) -> None:
        current, head = revisions(self.engine)
        if current != head:
            raise SchemaNotReady(
                f"database is at revision {current}, this bridge needs {head}: "
                "run `mqchat db upgrade` first"
            )


def _settle(done: asyncio.Future[None], published: asyncio.Future[None]) -> None:
    """Pass a publish's outcome on to the future its batch waits for."""
    if done.done():
        return
    if published.cancelled():
        done.cancel()
    elif (exc := published.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(None)


def _contact(user: str, online: bool, at: datetime) -> protocol.ContactPresence:
    return protocol.ContactPresence(username=user, state="online" if online else "offline", at=at)


def _presence_publish(
    user: str, words: Sequence[protocol.ContactPresence], snapshot: bool
) -> list[_Publish]:
    """``words`` for ``user``'s ``down/presence``, in chunks of :data:`PRESENCE_CHUNK`."""
    return [
        _Publish(
            topics.down_presence(user),
            protocol.encode(
                protocol.DownPresence(users=list(words[i : i + PRESENCE_CHUNK]), snapshot=snapshot)
            ),
        )
        for i in range(0, len(words), PRESENCE_CHUNK)
    ]
