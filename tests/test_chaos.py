"""No message is ever lost: the CI-sized chaos run, checked Jepsen-style.

Three pairs of users message each other through the SDK (clients behind a TCP proxy)
while a seeded schedule applies every fault kind of :data:`tests.support.chaos.FAULT_KINDS`
twice: the bridge killed at random moments and at its three dangerous points
(``MQCHAT_BRIDGE_CRASH_AT``), restarted gracefully, frozen past its keepalive;
mosquitto killed; PostgreSQL restarted and crashed; the client<->broker,
bridge<->broker and bridge<->PostgreSQL paths cut and stalled. Half the senders give
up waiting for a ``sent`` receipt after :data:`SHORT_TIMEOUT`, so outcomes go unknown
and the checker must find them recovered. Afterwards :func:`tests.support.chaos.check`
reconciles every sender's operation log, every device's received log and the
database. Replay a run with ``MQCHAT_CHAOS_SEED=<seed>`` (printed on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from bridge.config import BridgeSettings
from mqchat import ChatClient

from .support import chaos
from .support.chaos import History, Op, Received, StoredRow, check, stored_rows
from .support.services import PostgresServer
from .support.stack import Stack
from .support.tcp_proxy import TcpProxy

PAIRS = (("alice", "bob"), ("carol", "dave"), ("erin", "frank"))
ROUNDS = 3  # every fault kind this many times
MAX_PER_SENDER = 3000
PACE = 0.05  # seconds between one sender's sends
SHORT_TIMEOUT = 2.0  # half the senders: past it the outcome is logged unknown
SEND_TIMEOUT = 90.0  # the other half
TAIL = 2.0  # seconds of load after the last fault
QUIET_TIMEOUT = 60.0  # seconds for every device to catch up before checking

Test = TypeVar("Test", bound=Callable[..., Any])


def _plan(rounds: int) -> tuple[int, list[tuple[float, chaos.Fault]]]:
    """A seed (``MQCHAT_CHAOS_SEED`` to replay a run, else a new one) and its schedule
    of every fault kind ``rounds`` times."""
    value = os.environ.get("MQCHAT_CHAOS_SEED")
    seed = int(value) if value else secrets.randbelow(1_000_000)
    plan = chaos.schedule(
        seed, chaos.FAULT_KINDS, rounds=rounds, first_at=(1.0, 2.0), gap=(0.5, 1.5)
    )
    return seed, plan


def _chaos_run(test: Test) -> Test:
    """A chaos run: minutes of a stack under faults, on the one worker of the
    CPU-heavy tests."""
    for mark in (pytest.mark.xdist_group("cpu_heavy"), pytest.mark.slow, pytest.mark.timeout(420)):
        test = mark(test)
    return test


@_chaos_run
async def test_no_message_is_lost_under_every_fault(
    production_stack: Stack, postgres: PostgresServer
) -> None:
    stack = production_stack
    seed, plan = _plan(ROUNDS)
    print(f"\nchaos seed {seed} (replay: MQCHAT_CHAOS_SEED={seed}), {len(plan)} faults")
    print("plan: " + ", ".join(f"{at:.1f}s {fault}" for at, fault in plan))

    users = [user for pair in PAIRS for user in pair]
    partner = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
    assert stack.mosquitto is not None
    async with _behind_proxies(stack, postgres, users) as (injector, clients):
        devices = {user: [f"{user}/phone"] for user in users}

        history = History()
        received: list[Received] = []
        stop = asyncio.Event()

        async def send_all(sender: str, timeout: float) -> None:
            for i in range(MAX_PER_SENDER):
                if stop.is_set():
                    return
                await history.send(clients[sender], sender, partner[sender], i, timeout)
                await asyncio.sleep(PACE)

        async def inject() -> None:
            try:
                await injector.run(plan, tail=TAIL)
            finally:
                stop.set()

        def caught_up() -> bool:
            return chaos.all_shown(
                stack, clients, received, lambda row: (row.sender, partner[row.sender])
            )

        load_ended, quiet_ended = await chaos.campaign(
            injector,
            clients,
            received,
            [inject(), *(send_all(user, timeout) for user, timeout in _timeouts(users))],
            caught_up,
            QUIET_TIMEOUT,
            stop.set,
        )

    report = check(history, received, stored_rows(stack), devices=devices)
    counts = injector.counts()
    summary = (
        f"chaos seed {seed} (replay: MQCHAT_CHAOS_SEED={seed}): load {load_ended:.1f}s, "
        f"caught up at {quiet_ended:.1f}s\n"
        f"faults per kind: {dict(sorted(counts.items()))}\n"
        "faults applied:\n  " + "\n  ".join(map(str, injector.applied)) + "\n" + report.render()
    )
    print(summary)
    assert report.ok, summary
    assert len(injector.applied) == len(plan), summary
    assert all(counts[kind] == ROUNDS for kind in chaos.FAULT_KINDS), summary
    # The unknown-outcome path ran: the short-timeout senders gave up on some sends
    # (the bridge was frozen for 8 s), and every one of them arrived after all.
    assert report.unknown > 0, summary
    assert len(report.recovered) == report.unknown, summary
    assert not report.unknown_absent, summary
    assert report.acknowledged > 0, summary
    assert report.stored == report.acknowledged + report.unknown, summary


GROUP_ROUNDS = 1  # the group run: every fault kind once


@_chaos_run
async def test_no_group_message_is_lost_or_shown_outside_membership_under_every_fault(
    production_stack: Stack, postgres: PostgresServer
) -> None:
    """A group under the same faults: every member device is shown exactly the group's
    stored sequence within its membership window, once and in order; frank is added
    a third of the way in, dave removed two thirds in (both under faults)."""
    stack = production_stack
    seed, plan = _plan(GROUP_ROUNDS)
    print(f"\ngroup chaos seed {seed} (replay: MQCHAT_CHAOS_SEED={seed}), {len(plan)} faults")
    users = [user for pair in PAIRS for user in pair]
    async with _behind_proxies(stack, postgres, users) as (injector, clients):
        history = History()
        group_ops = chaos.GroupOps(stack, history)
        created = await group_ops.apply(
            clients["alice"],
            "alice",
            "create",
            name="chaos",
            members=["bob", "carol", "dave", "erin"],
            timeout=30,
        )
        group = created.conversation
        received: list[Received] = []
        stop = asyncio.Event()
        frank_added = asyncio.Event()

        async def send_all(sender: str, timeout: float) -> None:
            # frank sends once he is in: a refusal before would not be final, since a
            # late resend of the same id may be stored after the add (reported apart).
            # dave goes on sending after his removal, and is refused for good.
            if sender == "frank":
                await frank_added.wait()
            for i in range(MAX_PER_SENDER):
                if stop.is_set():
                    return
                await history.send(clients[sender], sender, None, i, timeout, conversation=group)
                await asyncio.sleep(PACE)

        async def change_members() -> None:
            last_at = plan[-1][0]
            await asyncio.sleep(last_at / 3)
            await group_ops.apply(
                clients["alice"], "alice", "add", conversation=group, members=["frank"], timeout=120
            )
            frank_added.set()
            await asyncio.sleep(max(0.0, 2 * last_at / 3 - (time.monotonic() - injector.started)))
            await group_ops.apply(
                clients["alice"],
                "alice",
                "remove",
                conversation=group,
                members=["dave"],
                timeout=120,
            )

        async def inject() -> None:
            try:
                await asyncio.gather(injector.run(plan, tail=TAIL), change_members())
            finally:
                stop.set()

        def caught_up() -> bool:
            windows = group_ops.windows[group]
            return chaos.all_shown(
                stack,
                clients,
                received,
                lambda row: [
                    u for u, window in windows.items() if chaos.in_window(window, row.seq)
                ],
            )

        def ended() -> None:
            stop.set()
            frank_added.set()

        await chaos.campaign(
            injector,
            clients,
            received,
            [inject(), *(send_all(user, timeout) for user, timeout in _timeouts(users))],
            caught_up,
            QUIET_TIMEOUT,
            ended,
        )

    report = check(
        history,
        received,
        chaos.stored_rows(stack),
        devices={user: [f"{user}/phone"] for user in users},
        windows=group_ops.windows,
    )
    windows = group_ops.windows[group]
    summary = (
        f"group chaos seed {seed} (replay: MQCHAT_CHAOS_SEED={seed}); windows {windows}\n"
        "faults applied:\n  " + "\n  ".join(map(str, injector.applied)) + "\n" + report.render()
    )
    print(summary)
    assert report.ok, summary
    assert len(injector.applied) == len(plan), summary
    # The member changes happened mid-run, between the group's messages.
    (frank,) = windows["frank"]
    (dave,) = windows["dave"]
    assert dave[1] is not None, summary
    assert frank[0] < dave[1], summary
    shown_to = Counter(r.user for r in received if r.conversation == group)
    assert 0 < shown_to["frank"] < shown_to["alice"], summary
    assert 0 < shown_to["dave"] < shown_to["alice"], summary
    refused = Counter(op.sender for op in history.ops if op.kind == "fail")
    assert refused["dave"] > 0, summary  # sent after his removal, and refused


@contextlib.asynccontextmanager
async def _behind_proxies(
    stack: Stack, postgres: PostgresServer, users: list[str]
) -> AsyncIterator[tuple[chaos.Injector, dict[str, ChatClient]]]:
    """The fault injector, with a proxy it can cut or slow between every client and
    the broker, the bridge and the broker, the bridge and PostgreSQL; ``users`` made,
    the history API started, and one SDK client per user (device ``phone``) behind the
    first proxy."""
    await stack.add_users(*users)
    await stack.start_api()
    async with (
        TcpProxy(stack.host, stack.port) as client_proxy,
        TcpProxy(stack.host, stack.port) as broker_proxy,
        TcpProxy(postgres.host, postgres.port) as db_proxy,
    ):
        injector = chaos.Injector(
            stack, postgres, clients=client_proxy, bridge_broker=broker_proxy, bridge_db=db_proxy
        )
        await injector.route_bridge()
        yield injector, await _clients(stack, client_proxy, users)


def _timeouts(users: list[str]) -> list[tuple[str, float]]:
    """Half the senders give up early (their outcomes become unknown), half wait."""
    return [(user, SHORT_TIMEOUT if i % 2 == 0 else SEND_TIMEOUT) for i, user in enumerate(users)]


async def _clients(stack: Stack, proxy: TcpProxy, users: list[str]) -> dict[str, ChatClient]:
    """One SDK client per user (device ``phone``) behind ``proxy``, closed by the stack."""
    return {
        user: await stack.client(user, port=proxy.port, history=stack.history(user))
        for user in users
    }


def test_crash_at_setting_is_validated() -> None:
    env = {"database_url": "sqlite://", "password": "x"}
    assert BridgeSettings(**env).crash_at is None  # type: ignore[arg-type]
    assert BridgeSettings(**env, crash_at="after_commit:7").crash_at == "after_commit:7"  # type: ignore[arg-type]
    for bad in ("after_commit", "after_commit:0", "somewhere:3", "after_commit:x"):
        with pytest.raises(ValidationError):
            BridgeSettings(**env, crash_at=bad)  # type: ignore[arg-type]


# -- the checker itself -------------------------------------------------------------


def _sent(history: History, sender: str, n: int, to: str, conv: str, seq: int) -> StoredRow:
    message_id, body = f"{sender}-{n}", f"{sender} {n}"
    history.invoke(sender, message_id, f"to:{to}", body)
    history.ok(sender, message_id, f"to:{to}", body, conv, seq)
    return StoredRow(message_id, conv, seq, sender, body, pk=seq)


def _shown(device: str, row: StoredRow) -> Received:
    return Received(device, row.id, row.conversation, row.seq, row.sender, row.body)


def _clean() -> tuple[History, list[Received], list[StoredRow]]:
    history = History()
    rows = [_sent(history, "alice", n, "bob", "c1", n + 1) for n in range(3)]
    shown = [_shown(d, r) for r in rows for d in ("alice/phone", "bob/phone")]
    return history, shown, rows


def test_check_passes_a_clean_history() -> None:
    history, shown, rows = _clean()
    report = check(history, shown, rows)
    assert report.ok, report.render()
    assert (report.acknowledged, report.stored, report.deliveries) == (3, 3, 6)
    assert "VALID" in report.render()


def test_check_detects_a_lost_message() -> None:
    history, shown, rows = _clean()
    shown = [s for s in shown if not (s.device == "bob/phone" and s.seq == 2)]
    report = check(history, shown, rows)
    assert not report.ok
    assert len(report.lost) == 1
    assert "bob/phone" in report.lost[0]
    report = check(history, _clean()[1], rows[:2])  # acknowledged, not stored
    assert any("not stored" in item for item in report.lost)


def test_check_detects_a_duplicate() -> None:
    history, shown, rows = _clean()
    report = check(history, [*shown, shown[-1]], rows)
    assert not report.ok
    assert report.duplicated
    assert "INVALID" in report.render()


def test_check_detects_an_unexpected_message() -> None:
    history, shown, rows = _clean()
    ghost = StoredRow("mallory-1", "c1", 4, "alice", "never sent", pk=4)
    report = check(history, [*shown, _shown("bob/phone", ghost)], [*rows, ghost])
    assert not report.ok
    assert any("never invoked" in item for item in report.unexpected)


def test_check_detects_an_inversion() -> None:
    history, shown, rows = _clean()
    bob = [s for s in shown if s.device == "bob/phone"]
    alice = [s for s in shown if s.device == "alice/phone"]
    report = check(history, [*alice, bob[1], bob[0], bob[2]], rows)
    assert not report.ok
    assert any("after #" in item for item in report.order)
    # In storage: alice's second message stored before her first.
    swapped = [
        StoredRow(rows[0].id, "c1", 2, "alice", rows[0].body, pk=2),
        StoredRow(rows[1].id, "c1", 1, "alice", rows[1].body, pk=1),
        rows[2],
    ]
    report = check(history, [], swapped, devices={})
    assert any("sent alice-0 before alice-1" in item for item in report.order)
    assert any("receipt says" in item for item in report.order)


def test_check_counts_unknown_outcomes_that_arrived_as_recovered() -> None:
    history, shown, rows = _clean()
    history.invoke("bob", "bob-0", "to:alice", "bob 0")
    history.unknown("bob", "bob-0", "to:alice", "bob 0", "timeout")
    history.invoke("bob", "bob-1", "to:alice", "bob 1")
    history.unknown("bob", "bob-1", "to:alice", "bob 1", "timeout")
    row = StoredRow("bob-0", "c1", 4, "bob", "bob 0", pk=4)
    report = check(
        history, [*shown, _shown("alice/phone", row), _shown("bob/phone", row)], [*rows, row]
    )
    assert report.ok, report.render()
    assert report.recovered == ["('bob', 'bob-0')"]
    assert report.unknown_absent == ["('bob', 'bob-1')"]
    assert all(isinstance(op, Op) for op in history.ops)


def test_check_holds_group_members_to_their_membership_windows() -> None:
    """Group g: alice and bob from seq 1; carol added at 3; bob removed at 4."""
    history = History()
    rows = []
    for seq in range(1, 6):
        message_id, body = f"alice-{seq}", f"alice {seq}"
        history.invoke("alice", message_id, "conversation:g", body)
        history.ok("alice", message_id, "conversation:g", body, "g", seq)
        rows.append(StoredRow(message_id, "g", seq, "alice", body, pk=seq))
    windows: chaos.Windows = {"g": {"alice": [(1, None)], "bob": [(1, 4)], "carol": [(3, None)]}}
    devices = {user: [f"{user}/phone"] for user in ("alice", "bob", "carol")}
    exact = [
        *(_shown("alice/phone", row) for row in rows),
        *(_shown("bob/phone", row) for row in rows[:4]),
        *(_shown("carol/phone", row) for row in rows[2:]),
    ]
    report = check(history, exact, rows, devices=devices, windows=windows)
    assert report.ok, report.render()

    # bob shown seq 5 after his removal; carol shown seq 2 before she was added.
    leaked = [*exact, _shown("bob/phone", rows[4]), _shown("carol/phone", rows[1])]
    report = check(history, leaked, rows, devices=devices, windows=windows)
    assert sum("outside its membership window" in item for item in report.unexpected) == 2
    # carol never shown the event that added her (seq 3): lost.
    missing = [m for m in exact if (m.device, m.seq) != ("carol/phone", 3)]
    report = check(history, missing, rows, devices=devices, windows=windows)
    assert report.lost == ["('alice', 'alice-3') (g#3) not shown to carol/phone"]


def test_schedule_is_replayable_from_its_seed() -> None:
    kinds = chaos.FAULT_KINDS
    assert chaos.schedule(7, kinds, rounds=2, extra=1) == chaos.schedule(
        7, kinds, rounds=2, extra=1
    )
    plan = chaos.schedule(7, kinds, rounds=2, extra=1)
    assert {fault.kind for _, fault in plan} == set(kinds)
    assert len(plan) == 2 * len(kinds) + 1
    assert [at for at, _ in plan] == sorted(at for at, _ in plan)
    assert plan != chaos.schedule(8, kinds, rounds=2, extra=1)
