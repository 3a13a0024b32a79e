"""No message is ever lost: concurrent chat under injected faults, checked Jepsen-style.

Three pairs of users message each other through the SDK while a seeded schedule kills
the bridge and mosquitto with SIGKILL, stops PostgreSQL, and freezes the bridge past
its keepalive. Afterwards :func:`tests.chaos.check` reconciles every sender's operation
log, every device's received log and the database. Replay a run with
``MQCHAT_CHAOS_SEED=<seed>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time

import pytest

from clients.sdk import ChatClient

from . import chaos
from .chaos import History, Op, Received, StoredRow, check
from .conftest import Stack
from .services import PostgresServer
from .test_chat import stored

PAIRS = (("alice", "bob"), ("carol", "dave"), ("erin", "frank"))
#: fault kind -> (min, max) seconds it holds
FAULTS = {
    "kill -9 bridge": (0.5, 2.0),
    "kill -9 mosquitto": (0.5, 2.0),
    "stop postgres": (2.0, 4.0),
    "SIGSTOP bridge": (8.0, 9.0),  # keepalive is 5 s: the broker drops the bridge
}
EXTRA_FAULTS = 2  # drawn at random on top of one of each kind
MAX_PER_SENDER = 1500
PACE = 0.05  # seconds between one sender's sends
SEND_TIMEOUT = 90.0
LOAD_CAP = 70.0  # seconds of load at most, faults or not
TAIL = 2.0  # seconds of load after the last fault
QUIET_TIMEOUT = 60.0  # seconds for every device to catch up before checking


def _seed() -> int:
    value = os.environ.get("MQCHAT_CHAOS_SEED")
    return int(value) if value else secrets.randbelow(1_000_000)


async def _apply(stack: Stack, postgres: PostgresServer, fault: chaos.Fault) -> None:
    if fault.kind == "kill -9 bridge":
        stack.bridge.kill()
        await asyncio.sleep(fault.duration)
        await asyncio.to_thread(stack.start_bridge)
    elif fault.kind == "kill -9 mosquitto":
        assert stack.mosquitto is not None
        stack.mosquitto.kill()
        await asyncio.sleep(fault.duration)
        await asyncio.to_thread(stack.mosquitto.start)
    elif fault.kind == "stop postgres":
        try:
            await asyncio.to_thread(postgres.stop)
            await asyncio.sleep(fault.duration)
        finally:
            await asyncio.to_thread(postgres.start)
    elif fault.kind == "SIGSTOP bridge":
        assert stack.bridge.process is not None
        pid = stack.bridge.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(fault.duration)
        finally:
            os.kill(pid, signal.SIGCONT)
    else:
        raise ValueError(fault.kind)


@pytest.mark.slow
async def test_no_message_is_lost_under_faults(
    production_stack: Stack, postgres: PostgresServer
) -> None:
    stack = production_stack
    seed = _seed()
    plan = chaos.schedule(seed, FAULTS, extra=EXTRA_FAULTS)
    print(f"\nchaos seed {seed} (replay: MQCHAT_CHAOS_SEED={seed})")
    print("plan: " + ", ".join(f"{at:.1f}s {fault}" for at, fault in plan))

    users = [user for pair in PAIRS for user in pair]
    await stack.add_users(*users)
    await stack.start_api()
    clients = {
        user: await stack.client(user, "phone", history=stack.history(user)) for user in users
    }
    devices = {user: [f"{user}/phone"] for user in users}

    history = History()
    received: list[Received] = []
    applied: list[str] = []
    stop = asyncio.Event()
    started = time.monotonic()

    async def send_all(sender: str, to: str, client: ChatClient) -> None:
        for i in range(MAX_PER_SENDER):
            if stop.is_set() or time.monotonic() - started > LOAD_CAP:
                return
            await history.send(client, sender, to, i, SEND_TIMEOUT)
            await asyncio.sleep(PACE)

    async def receive_all(device: str, client: ChatClient) -> None:
        async for m in client.messages():
            received.append(
                Received(device, m.id, m.conversation, m.seq, m.sender, m.body, time.monotonic())
            )

    async def inject() -> None:
        try:
            for at, fault in plan:
                delay = started + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                begin = time.monotonic() - started
                await _apply(stack, postgres, fault)
                applied.append(f"{begin:5.1f}s-{time.monotonic() - started:5.1f}s {fault}")
            await asyncio.sleep(TAIL)
        finally:
            stop.set()

    receivers = [
        asyncio.create_task(receive_all(f"{user}/phone", client))
        for user, client in clients.items()
    ]
    try:
        await asyncio.gather(
            inject(),
            *(send_all(a, b, clients[a]) for a, b in PAIRS),
            *(send_all(b, a, clients[b]) for a, b in PAIRS),
        )
        load_ended = time.monotonic() - started

        # Quiet period: outboxes empty and every device shown every stored message.
        def caught_up() -> bool:
            if any(client.pending for client in clients.values()):
                return False
            rows = stored(stack)
            shown = {(r.device, r.sender, r.id) for r in received}
            for row in rows:
                pair = next(p for p in PAIRS if row.sender in p)
                for user in pair:
                    if (f"{user}/phone", row.sender, row.client_id) not in shown:
                        return False
            return True

        deadline = time.monotonic() + QUIET_TIMEOUT
        while not await asyncio.to_thread(caught_up) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        quiet_ended = time.monotonic() - started
    finally:
        stop.set()
        for task in receivers:
            task.cancel()
        for task in receivers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    rows = [
        StoredRow(r.client_id, r.conversation_id, r.seq, r.sender, r.body, r.pk or 0)
        for r in stored(stack)
    ]
    report = check(history, received, rows, devices=devices)
    summary = (
        f"chaos seed {seed}: load {load_ended:.1f}s, caught up at {quiet_ended:.1f}s\n"
        "faults applied:\n  " + "\n  ".join(applied) + "\n" + report.render()
    )
    print(summary)
    assert len(applied) == len(plan), summary
    assert report.ok, summary


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


def test_schedule_is_replayable_from_its_seed() -> None:
    assert chaos.schedule(7, FAULTS, extra=1) == chaos.schedule(7, FAULTS, extra=1)
    plan = chaos.schedule(7, FAULTS, extra=1)
    assert {fault.kind for _, fault in plan} == set(FAULTS)
    assert [at for at, _ in plan] == sorted(at for at, _ in plan)
