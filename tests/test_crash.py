"""A bridge killed with SIGKILL mid-stream loses nothing, duplicates nothing, reorders nothing."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import text
from sqlmodel import Session

from mqchat import ChatClient

from .support.services import PostgresServer
from .support.stack import Stack, stored

SENDERS = ("alice", "carol", "dave", "erin")
PER_SENDER = 500  # 2,000 messages in all


@pytest.mark.xdist_group("cpu_heavy")
async def test_kill_9_of_the_bridge_mid_stream(stack: Stack) -> None:
    await stack.add_users("bob", *SENDERS)
    bob = await stack.client("bob")
    clients = {name: await stack.client(name) for name in SENDERS}
    confirmed = 0
    killed = asyncio.Event()

    async def send_all(name: str, client: ChatClient) -> list[int]:
        nonlocal confirmed
        seqs = []
        for i in range(PER_SENDER):
            sent = await client.send(f"{name} {i}", to="bob", timeout=120)
            seqs.append(sent.seq)
            confirmed += 1
            if confirmed == 600:
                killed.set()
        return seqs

    async def crash_and_restart() -> None:
        await killed.wait()
        stack.bridge.kill()
        await asyncio.to_thread(stack.start_bridge)

    results = await asyncio.gather(
        *(send_all(name, client) for name, client in clients.items()), crash_and_restart()
    )

    for seqs in results[: len(SENDERS)]:
        assert seqs == list(range(1, PER_SENDER + 1))  # each a conversation of its own
    assert stack.bridge.starts == 2

    # Storage: every message exactly once, in each sender's order, seq gap-free.
    rows = stored(stack)
    assert len(rows) == len(SENDERS) * PER_SENDER
    for name in SENDERS:
        mine = sorted((r for r in rows if r.sender == name), key=lambda r: r.seq)
        assert [r.body for r in mine] == [f"{name} {i}" for i in range(PER_SENDER)]
        assert [r.seq for r in mine] == list(range(1, PER_SENDER + 1))

    # Delivery: bob sees every message once, in order within each conversation.
    seen: dict[str, list[str]] = {name: [] for name in SENDERS}
    for _ in range(len(SENDERS) * PER_SENDER):
        message = await bob.next_message(timeout=60)
        seen[message.sender].append(message.body)
    for name in SENDERS:
        assert seen[name] == [f"{name} {i}" for i in range(PER_SENDER)]


async def test_database_outage_holds_messages_until_it_is_back(stack: Stack) -> None:
    """While the database refuses writes the bridge acks nothing; then it catches up."""
    alice, bob = await stack.two_who_chatted()

    release = threading.Event()
    locked = threading.Event()

    def hold_the_database() -> None:
        # SQLite: another process's write lock. PostgreSQL: the conversation row
        # locked by another transaction. Either way the bridge's commit cannot happen.
        with Session(stack.engine) as session:
            if stack.engine.dialect.name == "postgresql":
                session.execute(text("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE"))
            else:
                session.execute(text("UPDATE accounts SET disabled = disabled"))
            locked.set()
            release.wait(60)
            session.rollback()

    holder = threading.Thread(target=hold_the_database)
    holder.start()
    try:
        await asyncio.to_thread(locked.wait, 10)
        sending = asyncio.create_task(alice.send("during", to="bob", timeout=60))
        done, _ = await asyncio.wait({sending}, timeout=1.5)
        assert not done, "a message was confirmed while the database could not commit"
        assert alice.pending
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 30)
    sent = await sending
    assert sent.seq == 2
    assert (await bob.next_message(timeout=30)).body == "during"
    assert [r.body for r in stored(stack)] == ["before", "during"]


async def test_postgres_restart_loses_nothing(
    production_stack: Stack, postgres: PostgresServer
) -> None:
    """The database goes away entirely: the bridge retries, acks nothing, then resumes."""
    stack = production_stack
    alice, bob = await stack.two_who_chatted()

    await asyncio.to_thread(postgres.stop)
    try:
        sending = [
            asyncio.create_task(alice.send(f"during {i}", to="bob", timeout=90)) for i in range(5)
        ]
        done, _ = await asyncio.wait(sending, timeout=2)
        assert not done, "a message was confirmed while PostgreSQL was down"
    finally:
        await asyncio.to_thread(postgres.start)
    sent = await asyncio.gather(*sending)
    assert [s.seq for s in sent] == [2, 3, 4, 5, 6]
    got = [await bob.next_message(timeout=30) for _ in range(5)]
    assert [m.body for m in got] == [f"during {i}" for i in range(5)]
    assert "database unavailable; holding" in stack.bridge.log_text()
