"""Typing indicators: relayed to the other members only, rate limited, never stored."""

from __future__ import annotations

import asyncio
import json

from sqlmodel import Session, func, select

from clients.mqtt import Incoming
from protocol import topics
from store.tables import Message

from .support.stack import Stack


async def test_typing_reaches_the_other_member_only_and_is_rate_limited(stack: Stack) -> None:
    await stack.add_users("alice", "bob", "carol")
    alice = await stack.client("alice")
    bob = await stack.client("bob")
    carol_saw: asyncio.Queue[bytes] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        carol_saw.put_nowait(m.payload)

    carol = await stack.raw("carol", on_message=on_message)
    await carol.subscribe(topics.down("carol", "typing"), qos=0)
    sent = await alice.send("hi", to="bob", timeout=20)
    await bob.next_message(timeout=10)

    for _ in range(10):
        alice.set_typing(sent.conversation)  # a burst: only the first is relayed
    alice.set_typing(sent.conversation, typing=False)

    first = await asyncio.wait_for(bob.typing_events.get(), 10)
    second = await asyncio.wait_for(bob.typing_events.get(), 10)
    assert (first.from_, first.conversation, first.typing) == ("alice", sent.conversation, True)
    assert second.typing is False
    assert bob.typing_events.empty()
    assert alice.typing_events.empty()  # the typist is not told about herself
    assert carol_saw.empty()
    with Session(stack.engine) as session:
        assert session.exec(select(func.count()).select_from(Message)).one() == 1


async def test_typing_in_someone_elses_conversation_is_refused(stack: Stack) -> None:
    await stack.add_users("alice", "bob", "mallory")
    alice = await stack.client("alice")
    sent = await alice.send("hi", to="bob", timeout=20)
    errors: asyncio.Queue[dict[str, str]] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        errors.put_nowait(json.loads(m.payload))

    mallory = await stack.raw("mallory", on_message=on_message)
    await mallory.subscribe(topics.down_error("mallory"), qos=1)
    payload = json.dumps({"conversation": sent.conversation, "typing": True}).encode()
    await mallory.publish(topics.up("mallory", "typing"), payload, qos=1)
    error = await asyncio.wait_for(errors.get(), 10)
    assert error["code"] == "unknown_conversation"
