"""Two bridge instances on one broker (no shared subscriptions): order and seq hold."""

from __future__ import annotations

import asyncio
import contextlib
import re
import zlib
from collections.abc import AsyncIterator

import pytest

from mqchat import ChatClient
from store.tables import Message

from .support.services import Daemon
from .support.stack import BRIDGE_READY, Stack, start_two_bridges, stored

PER_SENDER = 300


def partition_of(user: str) -> int:
    return zlib.crc32(user.encode()) % 2


@contextlib.asynccontextmanager
async def two_bridges(stack: Stack) -> AsyncIterator[Daemon]:
    """The second bridge; both are stopped at the end, so that what is stored is final."""
    second = await start_two_bridges(stack)
    try:
        yield second
    finally:
        second.stop()
        stack.bridge.stop()


def by_seq(stack: Stack) -> list[Message]:
    return sorted(stored(stack), key=lambda r: r.seq)


def uplinks_handled(bridge: Daemon) -> int:
    return sum(int(n) for n in re.findall(r"after handling (\d+) uplinks", bridge.log_text()))


@pytest.mark.xdist_group("cpu_heavy")
async def test_two_bridges_keep_each_senders_order(stack: Stack) -> None:
    # alice and bob are handled by different instances, in one conversation.
    assert {partition_of("alice"), partition_of("bob")} == {0, 1}
    async with two_bridges(stack) as second:
        await stack.add_users("alice", "bob")
        alice = await stack.client("alice")
        bob = await stack.client("bob")
        first = await alice.send("hello", to="bob", timeout=20)
        conversation = first.conversation
        halfway = asyncio.Event()

        async def send_all(client: ChatClient, name: str) -> None:
            for i in range(PER_SENDER):
                await client.send(f"{name} {i}", conversation=conversation, timeout=60)
                if name == "bob" and i == PER_SENDER // 2:
                    halfway.set()

        async def crash_second() -> None:
            # The instance handling one of the senders dies mid-stream and comes back.
            await halfway.wait()
            second.kill()
            await asyncio.to_thread(second.start)
            await asyncio.to_thread(second.wait_for_log, BRIDGE_READY)

        await asyncio.gather(send_all(alice, "alice"), send_all(bob, "bob"), crash_second())

    rows = by_seq(stack)
    assert [r.seq for r in rows] == list(range(1, 2 * PER_SENDER + 2))
    for name in ("alice", "bob"):
        bodies = [r.body for r in rows if r.sender == name and r.body != "hello"]
        assert bodies == [f"{name} {i}" for i in range(PER_SENDER)]
    # Both instances did real work.
    for daemon in (stack.bridge, second):
        assert uplinks_handled(daemon) > 0, daemon.name


@pytest.mark.xdist_group("cpu_heavy")
async def test_two_bridges_keep_order_of_pipelined_stock_clients(stack: Stack) -> None:
    """Stock clients publish bursts without waiting for receipts.

    Every instance sees every uplink in order, so even without partitioning the
    dedupe would keep each sender's order; partitioning is what makes each uplink
    handled (and its deliveries published) once.
    """
    import json

    from core.mqtt import Incoming
    from protocol import topics

    async with two_bridges(stack) as second:
        await stack.add_users("alice", "bob")
        done = {"alice": asyncio.Event(), "bob": asyncio.Event()}
        receipts: dict[str, list[int]] = {"alice": [], "bob": []}

        def on_receipt(user: str) -> object:
            def handle(m: Incoming) -> None:
                if m.topic == topics.down_receipt(user):
                    receipts[user].append(json.loads(m.payload)["seq"])
                    if len(receipts[user]) == PER_SENDER:
                        done[user].set()

            return handle

        links = {}
        for user in ("alice", "bob"):
            links[user] = await stack.raw(user, on_message=on_receipt(user))  # type: ignore[arg-type]
            await links[user].subscribe(topics.down_receipt(user), qos=1)
        for i in range(PER_SENDER):
            for user, peer in (("alice", "bob"), ("bob", "alice")):
                payload = json.dumps({"id": f"{user}-{i}", "to": peer, "body": f"{user} {i}"})
                links[user].publish(topics.up_msg(user), payload.encode(), qos=1)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), 60)

    rows = by_seq(stack)
    assert [r.seq for r in rows] == list(range(1, 2 * PER_SENDER + 1))
    for name in ("alice", "bob"):
        assert [r.client_id for r in rows if r.sender == name] == [
            f"{name}-{i}" for i in range(PER_SENDER)
        ]
    # Each uplink was handled by exactly one instance (no double work, no double
    # deliveries), and each instance handled its own sender.
    handled = [uplinks_handled(d) for d in (stack.bridge, second)]
    assert handled == [PER_SENDER, PER_SENDER]
