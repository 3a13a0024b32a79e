"""Offline catch-up and gap fill from the history API: the broker's queue is a cache."""

from __future__ import annotations

import asyncio

from sqlmodel import Session, select

from mqchat import ChatClient
from store.tables import Cursor

from .support.services import wait_until
from .support.stack import Stack


async def receive(client: ChatClient, count: int, timeout: float = 30) -> list[tuple[int, str]]:
    got = []
    for _ in range(count):
        message = await client.next_message(timeout=timeout)
        got.append((message.seq, message.body))
    return got


async def test_a_new_device_gets_the_whole_history(stack: Stack) -> None:
    await stack.start_api()
    await stack.add_users("alice", "bob")
    alice = await stack.client("alice")
    for i in range(30):
        await alice.send(f"m{i}", to="bob", timeout=20)

    # bob's tablet has never connected: no session on the broker, nothing queued.
    tablet = await stack.client("bob", "tablet", history=stack.history("bob"))
    assert await receive(tablet, 30) == [(i + 1, f"m{i}") for i in range(30)]
    await alice.send("live", to="bob", timeout=20)
    assert await receive(tablet, 1) == [(31, "live")]
    assert tablet.pending == []


async def test_catch_up_after_three_times_what_the_broker_queues(stack: Stack) -> None:
    queue_limit = 20
    stack.limit_broker_queue(queue_limit)
    await stack.add_users("alice", "bob")  # after the restart: dynsec keeps accounts anyway
    await stack.start_api()
    bob = await stack.client("bob", "phone", history=stack.history("bob"))
    await bob.close()  # offline, with a persistent session that queues at most 20
    alice = await stack.client("alice")
    for i in range(3 * queue_limit):
        await alice.send(f"m{i}", to="bob", timeout=20)

    bob = await stack.client("bob", "phone", history=stack.history("bob"))
    # Queued ones and fetched ones together: every message once, in order.
    assert await receive(bob, 3 * queue_limit) == [(i + 1, f"m{i}") for i in range(3 * queue_limit)]
    await alice.send("after", to="bob", timeout=20)
    assert await receive(bob, 1) == [(3 * queue_limit + 1, "after")]


async def test_a_device_resumes_from_its_own_cursor(stack: Stack) -> None:
    await stack.start_api()
    await stack.add_users("alice", "bob")
    alice = await stack.client("alice")
    phone = await stack.client("bob", "phone", history=stack.history("bob"))
    for i in range(10):
        await alice.send(f"m{i}", to="bob", timeout=20)
    assert len(await receive(phone, 10)) == 10
    await alice.send("marker", to="bob", timeout=20)
    assert await receive(phone, 1) == [(11, "marker")]
    # The SDK acks delivery by itself; wait until the bridge has stored it.
    await asyncio.to_thread(
        wait_until,
        lambda: delivered_cursor(stack, "bob", "phone") == 11,
        timeout=15,
        what="bob's phone's delivered cursor",
    )
    await phone.close()
    for i in range(10, 15):
        await alice.send(f"m{i}", to="bob", timeout=20)

    # A new process for the same device, given no cursors: it asks the server.
    phone = await stack.client("bob", "phone", history=stack.history("bob"))
    assert await receive(phone, 5) == [(12 + i, f"m{10 + i}") for i in range(5)]
    await alice.send("live", to="bob", timeout=20)
    assert await receive(phone, 1) == [(17, "live")]  # nothing old shown again before it


def delivered_cursor(stack: Stack, user: str, device: str) -> int:
    with Session(stack.engine) as session:
        cursor = session.exec(
            select(Cursor).where(Cursor.username == user, Cursor.device == device)
        ).first()
        return cursor.delivered_seq if cursor is not None else 0


async def test_a_gap_seen_live_is_filled_from_the_history(stack: Stack) -> None:
    """A device that stops reading (a stalled network) while messages pour in loses
    some at the broker (mosquitto: 100 in flight + the queue, then it drops); the next
    live message shows a gap in seq, which the SDK fills from the history API."""
    stack.limit_broker_queue(20)
    await stack.add_users("alice", "bob")
    await stack.start_api()
    bob = await stack.client("bob", "phone", history=stack.history("bob"), hold_back=0.5)
    alice = await stack.client("alice", ack_delivered=False)
    first = await alice.send("m0", to="bob", timeout=20)
    assert await receive(bob, 1) == [(1, "m0")]

    loop = asyncio.get_running_loop()
    fd = bob.link._fd
    assert fd is not None
    loop.remove_reader(fd)  # bob's network stalls: nothing is read, nothing acked
    try:
        for i in range(1, 200):
            await alice.send(f"m{i}", conversation=first.conversation, timeout=20)
    finally:
        loop.add_reader(fd, bob.link._readable)
    await alice.send("m200", conversation=first.conversation, timeout=20)

    assert await receive(bob, 200) == [(i + 1, f"m{i}") for i in range(1, 201)]
