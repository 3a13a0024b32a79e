"""Jepsen-style bookkeeping for fault-injection runs: record, schedule faults, check.

::

    senders ─▶ History (invoke / ok / fail / unknown per message id)
    devices ─▶ Received (what each device was shown, in order)      ─┐
    database ─▶ StoredRow (the rows of ``messages``)                 ├▶ check() ─▶ Report
    History ─────────────────────────────────────────────────────────┘

``check`` only reads the three logs, so it can be tested on hand-made ones. A message
is keyed by ``(sender, id)``: the id is the sender's idempotency key.

Outcomes of a send: ``ok`` (the ``sent`` receipt: the message is stored at
``conversation``/``seq``), ``fail`` (the bridge refused it, with a code), ``unknown``
(``SendTimeout`` or cancelled: it may or may not have been stored). An ``ok`` message
must reach storage and every member device; an ``unknown`` one that did is *recovered*.

:class:`Injector` applies the faults of a :func:`schedule` to a running stack (the
bridge as a subprocess, mosquitto, PostgreSQL and up to three :class:`TcpProxy`
paths); the CI run (``tests/test_chaos.py``) and the long run (``bench/chaos_long.py``)
share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy.engine import make_url

from mqchat import ChatClient, MessageRefused, SendTimeout
from protocol import topics
from store.tables import Message

from .services import PostgresServer
from .stack import Stack, stored
from .tcp_proxy import TcpProxy

OpKind = Literal["invoke", "ok", "fail", "unknown"]
Key = tuple[str, str]  # (sender, message id)


class _Keyed:
    """A record of one message: in every log, :attr:`key` (sender, id) names the message."""

    __slots__ = ()
    id: str
    sender: str

    @property
    def key(self) -> Key:
        return (self.sender, self.id)


@dataclass(frozen=True, slots=True)
class Op(_Keyed):
    """One line of the operation log."""

    kind: OpKind
    id: str
    sender: str
    target: str  # "to:bob" or "conversation:<id>"
    body: str
    time: float
    conversation: str | None = None  # ok only
    seq: int | None = None  # ok only
    error: str | None = None  # fail: the MessageRefused code; unknown: why


@dataclass(frozen=True, slots=True)
class Received(_Keyed):
    """One message shown to one device (``device`` is ``"user/device"``)."""

    device: str
    id: str
    conversation: str
    seq: int
    sender: str
    body: str
    time: float = 0.0

    @property
    def user(self) -> str:
        return self.device.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class StoredRow(_Keyed):
    """One row of ``messages``; ``pk`` is the insertion order."""

    id: str
    conversation: str
    seq: int
    sender: str
    body: str
    pk: int = 0


class History:
    """The operation log of every sender, appended to as sends start and end."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def invoke(self, sender: str, id: str, target: str, body: str) -> None:
        self.ops.append(Op("invoke", id, sender, target, body, time.monotonic()))

    def ok(self, sender: str, id: str, target: str, body: str, conversation: str, seq: int) -> None:
        self.ops.append(Op("ok", id, sender, target, body, time.monotonic(), conversation, seq))

    def fail(self, sender: str, id: str, target: str, body: str, code: str) -> None:
        self.ops.append(Op("fail", id, sender, target, body, time.monotonic(), error=code))

    def unknown(self, sender: str, id: str, target: str, body: str, why: str) -> None:
        self.ops.append(Op("unknown", id, sender, target, body, time.monotonic(), error=why))

    async def send(
        self,
        client: ChatClient,
        sender: str,
        to: str | None,
        n: int,
        timeout: float,
        *,
        conversation: str | None = None,
    ) -> None:
        """Send message ``n`` of ``sender`` to ``to`` (or into the group ``conversation``)
        through the SDK, logging every outcome."""
        message_id, body = f"{sender}-{n:05d}", f"{sender} {n}"
        target = f"to:{to}" if to is not None else f"conversation:{conversation}"
        self.invoke(sender, message_id, target, body)
        try:
            sent = await client.send(
                body, to=to, conversation=conversation, id=message_id, timeout=timeout
            )
        except SendTimeout:
            self.unknown(sender, message_id, target, body, "timeout")
        except MessageRefused as exc:
            self.fail(sender, message_id, target, body, exc.code)
        except asyncio.CancelledError:
            self.unknown(sender, message_id, target, body, "cancelled")
            raise
        else:
            self.ok(sender, message_id, target, body, sent.conversation, sent.seq)


async def record_shown(device: str, client: ChatClient, received: list[Received]) -> None:
    """Append every message ``client`` shows to ``received``, as the checker reads it,
    until cancelled: the receiving side of every chaos run."""
    async for m in client.messages():
        received.append(
            Received(device, m.id, m.conversation, m.seq, m.sender, m.body, time.monotonic())
        )


#: conversation -> user -> the seqs ``(first, last)`` they were a member for; ``last``
#: None while still a member. A member added at N sees N (the event) on; one removed
#: at R sees R (the event) and nothing after.
Windows = dict[str, dict[str, list[tuple[int, int | None]]]]


def in_window(windows: Sequence[tuple[int, int | None]], seq: int) -> bool:
    return any(first <= seq and (last is None or seq <= last) for first, last in windows)


class GroupOps:
    """Membership changes of one group under faults, with their membership windows.

    An op is an ``up/group`` publish under a fixed id, published again every
    ``resend`` seconds until its event row is in the database (the id makes a resend
    harmless: the bridge answers it with the same receipt). The op goes to the
    History as ``invoke`` then ``ok`` with the stored row, on a lane of its own
    (``group:<conversation>``), so the checker holds its event to the same rules as a
    message: stored once, shown once to every member device in the window, in order.
    """

    def __init__(self, stack: Stack, history: History, resend: float = 2.0) -> None:
        self.stack = stack
        self.history = history
        self.resend = resend
        self.windows: Windows = {}

    async def apply(
        self, client: ChatClient, actor: str, op: str, *, timeout: float, **fields: object
    ) -> StoredRow:
        """Apply ``op`` as ``actor``; its event row, once stored."""
        op_id = f"{actor}-op-{op}-{len(self.history.ops)}"
        payload = {"id": op_id, "op": op, **fields}
        target = f"group:{fields.get('conversation', 'new')}"
        self.history.invoke(actor, op_id, target, op)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the link may be down: resent below
                published = client.link.publish(
                    topics.up(actor, "group"), json.dumps(payload).encode(), qos=1
                )
                published.add_done_callback(lambda f: f.cancelled() or f.exception())
            waited = time.monotonic() + self.resend
            while time.monotonic() < waited:
                row = await asyncio.to_thread(self._stored, actor, op_id)
                if row is not None:
                    self.history.ok(actor, op_id, target, row.body, row.conversation, row.seq)
                    self._move(row.conversation, actor, op, row.seq, fields)
                    return row
                await asyncio.sleep(0.25)
        raise AssertionError(f"group op {op_id} was not stored within {timeout} s")

    def _stored(self, actor: str, op_id: str) -> StoredRow | None:
        try:
            rows = stored(self.stack, actor)
        except Exception:  # PostgreSQL down or cut off: asked again
            return None
        for r in rows:
            if r.client_id == op_id:
                return StoredRow(r.client_id, r.conversation_id, r.seq, r.sender, r.body, r.pk or 0)
        return None

    def _move(
        self, conversation: str, actor: str, op: str, seq: int, fields: dict[str, object]
    ) -> None:
        windows = self.windows.setdefault(conversation, {})
        users = [str(u) for u in fields.get("members", []) or []]  # type: ignore[union-attr]
        if op == "create":
            for user in (actor, *users):
                windows.setdefault(user, []).append((seq, None))
        elif op == "add":
            for user in users:
                windows.setdefault(user, []).append((seq, None))
        elif op in ("remove", "leave"):
            for user in users if op == "remove" else [actor]:
                first, _ = windows[user][-1]
                windows[user][-1] = (first, seq)


def stored_rows(stack: Stack) -> list[StoredRow]:
    """The stack's ``messages`` table as the checker reads it."""
    return [
        StoredRow(r.client_id, r.conversation_id, r.seq, r.sender, r.body, r.pk or 0)
        for r in stored(stack)
    ]


async def cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel the receivers at the end of a run and wait until they have stopped."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def all_shown(
    stack: Stack,
    clients: dict[str, ChatClient],
    received: list[Received],
    recipients: Callable[[Message], Iterable[str]],
) -> bool:
    """Caught up: no client has a send pending, and every message the stack stored has
    been shown on the ``phone`` of each of its ``recipients``."""
    if any(client.pending for client in clients.values()):
        return False
    shown = {(r.device, r.sender, r.id) for r in received}
    return all(
        (f"{user}/phone", row.sender, row.client_id) in shown
        for row in stored(stack)
        for user in recipients(row)
    )


async def campaign(
    injector: Injector,
    clients: dict[str, ChatClient],
    received: list[Received],
    load: Sequence[Awaitable[object]],
    caught_up: Callable[[], bool],
    quiet_timeout: float,
    ended: Callable[[], None],
) -> tuple[float, float]:
    """A chaos run: every client's device recorded into ``received`` while ``load``
    (the fault injector and the senders) runs, then up to ``quiet_timeout`` seconds
    for ``caught_up``; ``ended`` (stop the senders) runs however it ends.

    Returns:
        the seconds from the start to the end of the load, and to the catch-up.
    """
    receivers = [
        asyncio.create_task(record_shown(f"{user}/phone", client, received))
        for user, client in clients.items()
    ]
    injector.started = time.monotonic()
    try:
        await asyncio.gather(*load)
        load_ended = time.monotonic() - injector.started
        deadline = time.monotonic() + quiet_timeout
        while not await asyncio.to_thread(caught_up) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        return load_ended, time.monotonic() - injector.started
    finally:
        ended()
        await cancel(receivers)


# -- the checker --------------------------------------------------------------------


@dataclass
class Report:
    invoked: int = 0
    acknowledged: int = 0
    failed: int = 0
    unknown: int = 0
    stored: int = 0
    deliveries: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    unknown_absent: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No loss, no duplicate, nothing unexpected, no order violation."""
        return not (self.lost or self.duplicated or self.unexpected or self.order)

    def verdict(self) -> str:
        if self.ok:
            return (
                f"VALID: {self.acknowledged} acknowledged messages, all stored once and shown once "
                f"to every member device, in order ({len(self.recovered)} of "
                f"{self.unknown} unknown outcomes recovered)"
            )
        return (
            f"INVALID: lost={len(self.lost)} duplicated={len(self.duplicated)} "
            f"unexpected={len(self.unexpected)} order={len(self.order)}"
        )

    def render(self, details: int = 10) -> str:
        rows = [
            ("invoked", self.invoked, ""),
            ("ok (sent receipt)", self.acknowledged, ""),
            ("fail (MessageRefused)", self.failed, ""),
            ("unknown (timeout/cancel)", self.unknown, ""),
            ("stored rows", self.stored, ""),
            ("deliveries to devices", self.deliveries, ""),
            ("lost", len(self.lost), "VIOLATION" if self.lost else ""),
            ("duplicated", len(self.duplicated), "VIOLATION" if self.duplicated else ""),
            ("unexpected", len(self.unexpected), "VIOLATION" if self.unexpected else ""),
            ("order violations", len(self.order), "VIOLATION" if self.order else ""),
            ("recovered (unknown, arrived)", len(self.recovered), ""),
            ("unknown, never stored", len(self.unknown_absent), ""),
        ]
        width = max(len(name) for name, _, _ in rows)
        lines = [f"{'check':<{width}} | {'count':>7} |", f"{'-' * width}-+-{'-' * 7}-+-"]
        lines += [f"{name:<{width}} | {count:>7} | {flag}" for name, count, flag in rows]
        for title, items in (
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("unexpected", self.unexpected),
            ("order", self.order),
        ):
            for item in items[:details]:
                lines.append(f"  {title}: {item}")
            if len(items) > details:
                lines.append(f"  {title}: ... and {len(items) - details} more")
        lines.append(self.verdict())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def check(
    history: History | Iterable[Op],
    received: Iterable[Received],
    stored_rows: Iterable[StoredRow],
    *,
    devices: dict[str, Sequence[str]] | None = None,
    members: dict[str, set[str]] | None = None,
    windows: Windows | None = None,
) -> Report:
    """Reconcile what was sent, what each device was shown, and what is stored.

    Args:
        devices: user -> the devices ("user/device") that must be shown every message
            of the user's conversations; by default the devices in ``received``.
        members: conversation -> its member users; by default inferred from the
            ``to:`` sends (the sender and the recipient).
        windows: for groups, conversation -> user -> membership windows
            (:class:`GroupOps`): a row must be shown to the devices of exactly the
            users whose window holds its seq; one shown outside is unexpected.
    """
    windows = windows or {}
    ops = list(history.ops if isinstance(history, History) else history)
    shown = list(received)
    rows = list(stored_rows)
    report = Report()

    invoked: dict[Key, Op] = {}
    invoke_order: list[Key] = []
    outcome: dict[Key, Op] = {}
    for op in ops:
        if op.kind == "invoke":
            if op.key not in invoked:
                invoked[op.key] = op
                invoke_order.append(op.key)
        else:
            outcome[op.key] = op
    report.invoked = len(invoked)
    kinds = Counter(outcome[key].kind if key in outcome else "unknown" for key in invoked)
    report.acknowledged, report.failed, report.unknown = (
        kinds["ok"],
        kinds["fail"],
        kinds["unknown"],
    )
    report.stored = len(rows)
    report.deliveries = len(shown)

    by_key: dict[Key, list[StoredRow]] = defaultdict(list)
    for row in rows:
        by_key[row.key].append(row)

    if devices is None:
        found: dict[str, set[str]] = defaultdict(set)
        for message in shown:
            found[message.user].add(message.device)
        devices = {user: sorted(names) for user, names in found.items()}
    if members is None:
        members = defaultdict(set)
        for key, op in outcome.items():
            if op.kind == "ok" and op.conversation and key in invoked:
                members[op.conversation] |= {op.sender, *_to_user(op.target)}
        for row in rows:
            op = invoked.get(row.key)
            if op is not None:
                members[row.conversation] |= {op.sender, *_to_user(op.target)}

    seen_at: dict[str, dict[Key, list[Received]]] = defaultdict(lambda: defaultdict(list))
    for message in shown:
        seen_at[message.device][message.key].append(message)

    # Duplicates: a device shown one message (or one conversation seq) twice; a
    # message stored twice.
    for device, messages in seen_at.items():
        for key, copies in messages.items():
            if len(copies) > 1:
                report.duplicated.append(f"{device} shown {key} {len(copies)} times")
        seqs = Counter((m.conversation, m.seq) for m in shown if m.device == device)
        for (conversation, seq), n in seqs.items():
            if n > 1:
                report.duplicated.append(f"{device} shown {conversation}#{seq} {n} times")
    for key, copies in by_key.items():
        if len(copies) > 1:
            report.duplicated.append(f"{key} stored {len(copies)} times")

    # Unexpected: stored or shown but never sent, or sent and refused.
    for key in by_key:
        if key not in invoked:
            report.unexpected.append(f"{key} stored but never invoked")
        elif key in outcome and outcome[key].kind == "fail":
            report.unexpected.append(f"{key} stored although it failed ({outcome[key].error})")
    for device, messages in seen_at.items():
        for key in messages:
            if key not in invoked:
                report.unexpected.append(f"{key} shown to {device} but never invoked")
            elif key not in by_key:
                report.unexpected.append(f"{key} shown to {device} but not stored")

    # Lost: acknowledged but not stored, or not shown to a member device.
    for key in invoke_order:
        op = outcome.get(key)
        copies = by_key.get(key)
        if op is not None and op.kind == "ok":
            if not copies:
                report.lost.append(f"{key} acknowledged as {op.conversation}#{op.seq}, not stored")
                continue
            row = copies[0]
            if (row.conversation, row.seq) != (op.conversation, op.seq):
                report.order.append(
                    f"{key} receipt says {op.conversation}#{op.seq}, "
                    f"stored as {row.conversation}#{row.seq}"
                )
            if row.body != op.body:
                report.unexpected.append(f"{key} stored with another body")
        elif copies:
            if op is None or op.kind == "unknown":
                report.recovered.append(f"{key}")
        else:
            if op is None or op.kind == "unknown":
                report.unknown_absent.append(f"{key}")
            continue
        if not copies:
            continue
        row = copies[0]
        if row.conversation in windows:
            group = windows[row.conversation]
            audience = sorted(u for u, w in group.items() if in_window(w, row.seq))
        else:
            audience = sorted(members.get(row.conversation, ()))
        for user in audience:
            for device in devices.get(user, ()):
                got = seen_at.get(device, {}).get(key)
                if not got:
                    if op is not None and op.kind == "ok":
                        report.lost.append(
                            f"{key} ({row.conversation}#{row.seq}) not shown to {device}"
                        )
                    else:
                        report.lost.append(
                            f"{key} (unknown outcome, stored as {row.conversation}#{row.seq}) "
                            f"not shown to {device}"
                        )
                elif (got[0].conversation, got[0].seq, got[0].body) != (
                    row.conversation,
                    row.seq,
                    row.body,
                ):
                    report.order.append(
                        f"{key} shown to {device} as {got[0].conversation}#{got[0].seq}, "
                        f"stored as {row.conversation}#{row.seq}"
                    )

    # Visibility: nobody is shown a group's row outside their membership window.
    for message in shown:
        group = windows.get(message.conversation)
        if group is not None and not in_window(group.get(message.user, []), message.seq):
            report.unexpected.append(
                f"{message.key} ({message.conversation}#{message.seq}) shown to"
                f" {message.device} outside its membership window"
            )

    # Order in storage: per conversation, seqs 1..n with no gap, rising with pk.
    per_conversation: dict[str, list[StoredRow]] = defaultdict(list)
    for row in rows:
        per_conversation[row.conversation].append(row)
    for conversation, conv_rows in per_conversation.items():
        seqs = sorted(r.seq for r in conv_rows)
        if seqs != list(range(1, len(seqs) + 1)):
            missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
            report.order.append(f"{conversation} stored seqs have gaps {missing[:10]}")
        by_pk = [r.seq for r in sorted(conv_rows, key=lambda r: r.pk)]
        if any(b <= a for a, b in itertools.pairwise(by_pk)):
            report.order.append(f"{conversation} seq not rising with insertion order")

    # Order at devices: per conversation, strictly rising seq in the order shown.
    last: dict[tuple[str, str], int] = {}
    for message in shown:
        where = (message.device, message.conversation)
        if where in last and message.seq <= last[where]:
            report.order.append(
                f"{message.device} shown {message.conversation}#{message.seq} after #{last[where]}"
            )
        last[where] = max(message.seq, last.get(where, 0))

    # Order per sender: within one target, stored seqs follow the send order.
    previous: dict[tuple[str, str], tuple[Key, int]] = {}
    for key in invoke_order:
        copies = by_key.get(key)
        if not copies:
            continue
        lane = (key[0], invoked[key].target)
        if lane in previous and copies[0].seq <= previous[lane][1]:
            report.order.append(
                f"{key[0]} sent {previous[lane][0][1]} before {key[1]} to {lane[1]}, "
                f"stored as #{previous[lane][1]} and #{copies[0].seq}"
            )
        previous[lane] = (key, copies[0].seq)
    return report


def _to_user(target: str) -> list[str]:
    return [target.removeprefix("to:")] if target.startswith("to:") else []


# -- fault schedules ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    duration: float  # how long the fault holds (outage, pause), seconds
    n: int = 1  # crash faults: the bridge dies the n-th time it reaches the point

    def __str__(self) -> str:
        arg = f" #{self.n}" if self.kind.startswith("crash") else ""
        return f"{self.kind}{arg}({self.duration:.1f}s)"


#: Every fault kind the injector knows -> (min, max) seconds it holds.
FAULT_KINDS: dict[str, tuple[float, float]] = {
    "kill -9 bridge": (0.3, 1.5),  # at a random moment
    "crash before_commit": (0.3, 1.0),  # MQCHAT_BRIDGE_CRASH_AT, see bridge/faults.py
    "crash after_commit": (0.3, 1.0),
    "crash after_publish": (0.3, 1.0),
    "SIGTERM bridge": (0.3, 1.0),  # graceful restart
    "SIGSTOP bridge": (8.0, 9.0),  # past 1.5 x keepalive (5 s): the broker drops it
    "kill -9 mosquitto": (0.3, 1.5),  # persistence on, autosave every 60 s
    "restart postgres": (1.0, 2.5),  # fast shutdown, then start
    "kill -9 postgres": (0.5, 1.5),  # immediate shutdown: WAL recovery on start
    "cut clients": (0.5, 2.0),  # client <-> broker
    "stall clients": (0.5, 2.0),
    "cut bridge-broker": (0.5, 2.0),
    "stall bridge-broker": (0.5, 2.0),
    "cut bridge-db": (0.5, 2.0),
    "stall bridge-db": (0.5, 2.0),
}


def schedule(
    seed: int,
    kinds: dict[str, tuple[float, float]],
    *,
    rounds: int = 1,
    extra: int = 0,
    first_at: tuple[float, float] = (2.0, 4.0),
    gap: tuple[float, float] = (3.0, 6.0),
) -> list[tuple[float, Fault]]:
    """A replayable fault plan: ``(at_seconds, Fault)`` sorted by time.

    Each of ``rounds`` rounds applies every kind in ``kinds`` (name -> (min, max)
    duration) once, in an order drawn from ``random.Random(seed)``; then ``extra``
    kinds drawn at random. A plan cut short after any round is still balanced. ``at``
    is the earliest start; the gap is counted from the previous fault's planned end.
    """
    rng = random.Random(seed)
    names: list[str] = []
    for _ in range(rounds):
        block = sorted(kinds)
        rng.shuffle(block)
        names += block
    names += [rng.choice(sorted(kinds)) for _ in range(extra)]
    plan: list[tuple[float, Fault]] = []
    at = rng.uniform(*first_at)
    for name in names:
        fault = Fault(name, round(rng.uniform(*kinds[name]), 2), rng.randint(1, 4))
        plan.append((round(at, 2), fault))
        at += fault.duration + rng.uniform(*gap)
    return plan


class FaultFailed(AssertionError):
    """A fault did not happen as planned (a crash point never reached, say)."""


@dataclass(frozen=True, slots=True)
class Applied:
    begin: float  # seconds since the start of the run
    end: float
    fault: Fault

    def __str__(self) -> str:
        return f"{self.begin:6.1f}s-{self.end:6.1f}s {self.fault}"


class Injector:
    """Applies faults to a running stack whose bridge runs behind the given proxies.

    ``clients`` sits between the devices and the broker, ``bridge_broker`` between
    the bridge and the broker, ``bridge_db`` between the bridge and PostgreSQL; use
    :meth:`route_bridge` to point the bridge at the last two.
    """

    CRASH_TIMEOUT = 30.0  # seconds for an armed bridge to reach its crash point

    def __init__(
        self,
        stack: Stack,
        postgres: PostgresServer,
        *,
        clients: TcpProxy | None = None,
        bridge_broker: TcpProxy | None = None,
        bridge_db: TcpProxy | None = None,
    ) -> None:
        self.stack = stack
        self.postgres = postgres
        self.proxies = {"clients": clients, "bridge-broker": bridge_broker, "bridge-db": bridge_db}
        self.applied: list[Applied] = []
        self.started = time.monotonic()

    async def route_bridge(self) -> None:
        """Restart the bridge so that it reaches the broker and the database via the proxies."""
        bridge = self.stack.bridge
        await asyncio.to_thread(bridge.stop)
        broker, db = self.proxies["bridge-broker"], self.proxies["bridge-db"]
        if broker is not None:
            bridge.reconfigure(mqtt_port=broker.port)
        if db is not None:
            url = make_url(self.stack.database_url).set(host=db.host, port=db.port)
            bridge.reconfigure(database_url=url.render_as_string(hide_password=False))
        await asyncio.to_thread(self.stack.start_bridge)

    def counts(self) -> Counter[str]:
        return Counter(a.fault.kind for a in self.applied)

    async def run(self, plan: Sequence[tuple[float, Fault]], *, tail: float = 0.0) -> None:
        """Apply ``plan`` (times from :attr:`started`), then wait ``tail`` seconds."""
        for at, fault in plan:
            delay = self.started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.apply(fault)
        await asyncio.sleep(tail)

    async def apply(self, fault: Fault) -> None:
        begin = time.monotonic() - self.started
        await self._apply(fault)
        self.applied.append(Applied(begin, time.monotonic() - self.started, fault))

    async def _apply(self, fault: Fault) -> None:
        stack, down = self.stack, fault.duration
        bridge = stack.bridge
        kind = fault.kind
        if kind == "kill -9 bridge":
            bridge.kill()
            await asyncio.sleep(down)
            await asyncio.to_thread(stack.start_bridge)
        elif kind.startswith("crash "):
            await self._crash(kind.removeprefix("crash "), fault.n, down)
        elif kind == "SIGTERM bridge":
            code = await asyncio.to_thread(bridge.stop)
            if code != 0:
                raise FaultFailed(
                    f"bridge exited with {code} on SIGTERM, not 0; its log ends:\n"
                    + bridge.log_text()[-3000:]
                )
            await asyncio.sleep(down)
            await asyncio.to_thread(stack.start_bridge)
        elif kind == "SIGSTOP bridge":
            pid = bridge.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(down)
            finally:
                os.kill(pid, signal.SIGCONT)
        elif kind == "kill -9 mosquitto":
            assert stack.mosquitto is not None
            stack.mosquitto.kill()
            await asyncio.sleep(down)
            await asyncio.to_thread(stack.mosquitto.start)
        elif kind in ("restart postgres", "kill -9 postgres"):
            stop = self.postgres.stop if kind == "restart postgres" else self.postgres.kill
            try:
                await asyncio.to_thread(stop)
                await asyncio.sleep(down)
            finally:
                await asyncio.to_thread(self.postgres.start)
        elif kind.startswith(("cut ", "stall ")):
            verb, path = kind.split()
            proxy = self.proxies[path]
            if proxy is None:
                raise FaultFailed(f"no proxy on the {path} path")
            if verb == "cut":
                proxy.cut()
            else:
                proxy.stall(down)
            try:
                await asyncio.sleep(down)
            finally:
                proxy.heal()
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def _crash(self, point: str, n: int, down: float) -> None:
        """Restart the bridge (SIGTERM) armed to SIGKILL itself at ``point``, then again."""
        bridge = self.stack.bridge
        await asyncio.to_thread(bridge.stop)
        bridge.reconfigure(crash_at=f"{point}:{n}")
        try:
            bridge.start()
            assert bridge.process is not None
            try:
                code = await asyncio.to_thread(bridge.process.wait, self.CRASH_TIMEOUT)
            except subprocess.TimeoutExpired:
                bridge.kill()
                raise FaultFailed(
                    f"bridge never reached {point} {n} times in {self.CRASH_TIMEOUT} s"
                ) from None
        finally:
            bridge.reconfigure(crash_at=None)
        if code != -signal.SIGKILL or f"crash point {point} reached" not in bridge.log_text():
            raise FaultFailed(
                f"armed bridge exited with {code}, not by its crash point {point}; its log "
                "ends:\n" + bridge.log_text()[-3000:]
            )
        await asyncio.sleep(down)
        await asyncio.to_thread(self.stack.start_bridge)
