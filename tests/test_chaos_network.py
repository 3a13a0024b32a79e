"""Chaos scenarios beside the CI run: the proxy itself, the broker queue overflowing,
catch-up retried while the history is down, one of two bridges killed.

Cuts and stalls of the client<->broker, bridge<->broker and bridge<->PostgreSQL paths
run in the CI run (``tests/test_chaos.py``). Every scenario here records what was sent
(:class:`tests.support.chaos.History`), what each device was shown and what is stored, then
reconciles them with :func:`tests.support.chaos.check`. Seeded; replay with
``MQCHAT_CHAOS_SEED=<seed>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest

from mqchat import ChatClient

from .support.chaos import History, Received, Report, check, record_shown, stored_rows
from .support.services import PostgresServer
from .support.stack import BRIDGE_READY, Stack, start_two_bridges, stored
from .support.tcp_proxy import TcpProxy

PAIRS = (("alice", "bob"), ("carol", "dave"))
PACE = 0.05
SEND_TIMEOUT = 60.0
QUIET_TIMEOUT = 45.0


def _seed() -> int:
    value = os.environ.get("MQCHAT_CHAOS_SEED")
    return int(value) if value else secrets.randbelow(1_000_000)


class Run:
    """Senders, receivers and the three logs of one scenario."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.history = History()
        self.received: list[Received] = []
        self.clients: dict[str, ChatClient] = {}
        self.receivers: dict[str, asyncio.Task[None]] = {}
        self.started = time.monotonic()

    async def connect(self, user: str, port: int | None = None) -> ChatClient:
        stack = self.stack
        client = await stack.client(user, port=port, history=stack.history(user))
        self.clients[user] = client
        receiving = record_shown(f"{user}/phone", client, self.received)
        self.receivers[user] = asyncio.create_task(receiving)
        return client

    async def disconnect(self, user: str) -> None:
        task = self.receivers.pop(user)
        await self.clients.pop(user).close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def send_many(
        self, sender: str, to: str, count: int, *, until: Callable[[], bool] = lambda: False
    ) -> None:
        client = self.clients[sender]
        for i in range(count):
            if until():
                return
            await self.history.send(client, sender, to, i, SEND_TIMEOUT)
            await asyncio.sleep(PACE)

    def _caught_up(self, users: list[str]) -> bool:
        if any(client.pending for client in self.clients.values()):
            return False
        shown = {(r.device, r.sender, r.id) for r in self.received}
        for row in stored(self.stack):
            pair = next(p for p in PAIRS if row.sender in p)
            for user in pair:
                if user in users and (f"{user}/phone", row.sender, row.client_id) not in shown:
                    return False
        return True

    async def finish(self, users: list[str], label: str, extra: str = "") -> Report:
        deadline = time.monotonic() + QUIET_TIMEOUT
        while not await asyncio.to_thread(self._caught_up, users):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        caught_up = time.monotonic() - self.started
        for user in list(self.receivers):
            await self.disconnect(user)
        devices: dict[str, Sequence[str]] = {user: [f"{user}/phone"] for user in users}
        report = check(self.history, self.received, stored_rows(self.stack), devices=devices)
        print(f"\n[{label}] caught up at {caught_up:.1f}s\n{extra}{report.render()}")
        return report


async def _load_under(run: Run, faults: Awaitable[list[str]]) -> list[str]:
    stop = asyncio.Event()

    async def inject() -> list[str]:
        try:
            return await faults
        finally:
            stop.set()

    results = await asyncio.gather(
        inject(),
        *(run.send_many(a, b, 2000, until=stop.is_set) for a, b in PAIRS),
        *(run.send_many(b, a, 2000, until=stop.is_set) for a, b in PAIRS),
    )
    return list(results[0] or [])


# -- the proxy itself ---------------------------------------------------------------


async def test_proxy_forwards_cuts_and_stalls() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with TcpProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        proxy.stall(0.5)
        writer.write(b"held")
        pending = asyncio.ensure_future(reader.readexactly(4))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pending), 0.3)
        assert await asyncio.wait_for(pending, 5) == b"held"
        proxy.cut()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        r2, w2 = await asyncio.open_connection(proxy.host, proxy.port)
        assert await asyncio.wait_for(r2.read(), 5) == b""  # refused while cut
        w2.close()
        proxy.heal()
        r3, w3 = await asyncio.open_connection(proxy.host, proxy.port)
        w3.write(b"back")
        assert await asyncio.wait_for(r3.readexactly(4), 5) == b"back"
        for w in (w2, w3, writer):
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
    server.close()
    await server.wait_closed()


# -- scenarios ----------------------------------------------------------------------


def _users() -> list[str]:
    return [user for pair in PAIRS for user in pair]


@pytest.fixture
async def queue_of_20(production_stack: Stack) -> Stack:
    """The production stack with a broker that queues at most 20 messages for an
    offline session (the bridge restarted on it), alice and bob, and the API."""
    stack = production_stack
    stack.bridge.stop()
    await asyncio.to_thread(stack.limit_broker_queue, 20)
    await asyncio.to_thread(stack.start_bridge)
    await stack.add_users("alice", "bob")
    await stack.start_api()
    return stack


@pytest.mark.slow
async def test_offline_device_catches_up_past_the_broker_queue(queue_of_20: Stack) -> None:
    stack, seed = queue_of_20, _seed()
    run = Run(stack)
    await run.connect("alice")
    await run.connect("bob")
    count = 60 + seed % 40
    await run.send_many("alice", "bob", 5)
    async with asyncio.timeout(20):  # bob's device has them: it knows the conversation
        while sum(r.device == "bob/phone" for r in run.received) < 5:
            await asyncio.sleep(0.05)
    await run.disconnect("bob")
    # The same ids would be deduplicated: continue alice's numbering.
    client = run.clients["alice"]
    for i in range(5, 5 + count):
        await run.history.send(client, "alice", "bob", i, SEND_TIMEOUT)
    await run.connect("bob")
    report = await run.finish(["alice", "bob"], "offline-overflow", f"seed {seed}, {count} sent\n")
    assert report.acknowledged == 5 + count
    assert report.ok, f"seed {seed}\n{report.render()}"


@pytest.mark.slow
async def test_two_bridges_with_one_killed(production_stack: Stack) -> None:
    stack, seed = production_stack, _seed()
    second = await start_two_bridges(stack)
    try:
        await stack.add_users(*_users())
        await stack.start_api()
        run = Run(stack)
        for user in _users():
            await run.connect(user)
        run.started = time.monotonic()
        rng_kill_at = 2.0 + (seed % 30) / 10

        async def kill_one() -> list[str]:
            await asyncio.sleep(rng_kill_at)
            victim = second if seed % 2 else stack.bridge
            victim.kill()
            await asyncio.sleep(1.5)
            victim.start()
            await asyncio.to_thread(victim.wait_for_log, BRIDGE_READY, timeout=30)
            await asyncio.sleep(2.0)
            return [f"{rng_kill_at:.1f}s kill -9 {victim.name}"]

        applied = await _load_under(run, kill_one())
        report = await run.finish(_users(), "two-bridges", f"seed {seed}: {applied}\n")
    finally:
        second.stop()
    assert report.acknowledged > 0
    assert report.ok, f"seed {seed}\n{report.render()}"


@pytest.mark.slow
async def test_catch_up_retries_until_the_history_answers(
    queue_of_20: Stack, postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The tail that overflowed the broker queue reaches bob although his first
    catch-up hit a dead database: nothing after that tail would reveal the gap, so
    only a catch-up retried on a timer can fetch it."""
    stack, seed = queue_of_20, _seed()
    count = 40 + seed % 20
    async with TcpProxy(stack.host, stack.port) as proxy:
        run = Run(stack)
        await run.connect("alice")
        bob = await run.connect("bob", proxy.port)
        await run.send_many("alice", "bob", 5)
        await _wait(lambda: sum(r.device == "bob/phone" for r in run.received) == 5, "bob: 5")
        generation = bob.link.generation
        proxy.cut()  # bob's session stays on the broker, which queues 20 and drops the rest
        await _wait(lambda: not bob.link.is_connected, "bob's link to drop")
        client = run.clients["alice"]
        for i in range(5, 5 + count):
            await run.history.send(client, "alice", "bob", i, SEND_TIMEOUT)
        caplog.set_level(logging.WARNING, logger="mqchat")
        await asyncio.to_thread(postgres.stop)
        try:
            proxy.heal()
            await asyncio.wait_for(bob.link.wait_reconnected(generation), 30)
            await _wait(
                lambda: any("catch-up failed, retrying" in r.message for r in caplog.records),
                "bob's catch-up to fail on the dead database",
            )
        finally:
            await asyncio.to_thread(postgres.start)
        report = await run.finish(
            ["alice", "bob"], "catch-up-retry", f"seed {seed}, {count} sent while bob was away\n"
        )
    assert report.acknowledged == 5 + count
    assert report.ok, f"seed {seed}\n{report.render()}"


async def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
