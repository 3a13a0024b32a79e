"""Typing indicators: relayed to the other members only, rate limited, never stored."""

from __future__ import annotations

import asyncio
import json

from core.mqtt import Incoming
from protocol import topics

from .support.stack import Stack, stored


async def test_typing_reaches_the_other_member_only_and_is_rate_limited(
    shared_stack: Stack,
) -> None:
    stack = shared_stack
    alice_name, bob_name, carol_name = await stack.new_users("alice", "bob", "carol")
    alice = await stack.client(alice_name)
    bob = await stack.client(bob_name)
    carol_saw: asyncio.Queue[bytes] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        carol_saw.put_nowait(m.payload)

    carol = await stack.raw(carol_name, on_message=on_message)
    await carol.subscribe(topics.down(carol_name, "typing"), qos=0)
    sent = await alice.send("hi", to=bob_name, timeout=20)
    await bob.next_message(timeout=10)

    for _ in range(10):
        alice.set_typing(sent.conversation)  # a burst: only the first is relayed
    alice.set_typing(sent.conversation, typing=False)

    first = await asyncio.wait_for(bob.typing_events.get(), 10)
    second = await asyncio.wait_for(bob.typing_events.get(), 10)
    assert (first.from_, first.conversation, first.typing) == (alice_name, sent.conversation, True)
    assert second.typing is False
    assert bob.typing_events.empty()
    assert alice.typing_events.empty()  # the typist is not told about herself
    assert carol_saw.empty()
    assert len(stored(stack, alice_name, bob_name, carol_name)) == 1


async def test_typing_in_someone_elses_conversation_is_refused(shared_stack: Stack) -> None:
    stack = shared_stack
    alice_name, bob, mallory_name = await stack.new_users("alice", "bob", "mallory")
    alice = await stack.client(alice_name)
    sent = await alice.send("hi", to=bob, timeout=20)
    errors: asyncio.Queue[dict[str, str]] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        errors.put_nowait(json.loads(m.payload))

    mallory = await stack.raw(mallory_name, on_message=on_message)
    await mallory.subscribe(topics.down_error(mallory_name), qos=1)
    payload = json.dumps({"conversation": sent.conversation, "typing": True}).encode()
    await mallory.publish(topics.up(mallory_name, "typing"), payload, qos=1)
    error = await asyncio.wait_for(errors.get(), 10)
    assert error["code"] == "unknown_conversation"
