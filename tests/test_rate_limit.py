"""A user over the message rate gets `rate_limited`, nothing is stored, others are unaffected."""

from __future__ import annotations

import asyncio
import json

from core.mqtt import Incoming
from protocol import topics

from .support.stack import Stack, stored


async def restart_bridge_with_rate(stack: Stack, rate: str) -> None:
    stack.bridge.stop()
    stack.bridge.env["MQCHAT_BRIDGE_MESSAGE_RATE"] = rate
    await asyncio.to_thread(stack.start_bridge)


async def test_a_flood_is_refused_and_others_keep_chatting(stack: Stack) -> None:
    await restart_bridge_with_rate(stack, "5/minute")
    await stack.add_users("mallory", "alice", "bob")
    answers: asyncio.Queue[tuple[str, dict[str, object]]] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        answers.put_nowait((m.topic.rsplit("/", 1)[-1], json.loads(m.payload)))

    mallory = await stack.raw("mallory", on_message=on_message)
    await mallory.subscribe(topics.down_all("mallory"), qos=1)
    for i in range(12):
        payload = json.dumps({"id": f"f{i}", "to": "bob", "body": "spam"}).encode()
        mallory.publish(topics.up_msg("mallory"), payload, qos=1)

    # alice has a rate of her own: her messages go through while mallory floods.
    alice = await stack.client("alice")
    for i in range(3):
        await alice.send(f"hello {i}", to="bob", timeout=20)

    sent, refused = [], []
    while len(sent) + len(refused) < 12:
        kind, payload = await asyncio.wait_for(answers.get(), 15)
        if kind == "receipt" and payload["status"] == "sent":
            sent.append(payload["id"])
        elif kind == "error":
            assert payload["code"] == "rate_limited"
            refused.append(payload["id"])
    assert sent == [f"f{i}" for i in range(5)]
    assert refused == [f"f{i}" for i in range(5, 12)]
    senders = [m.sender for m in stored(stack)]
    assert senders.count("mallory") == 5
    assert senders.count("alice") == 3


async def test_the_sdk_resends_what_was_rate_limited(stack: Stack) -> None:
    await restart_bridge_with_rate(stack, "3/2 seconds")
    await stack.add_users("alice", "bob")
    alice = await stack.client("alice", resend_after=0.5)
    bob = await stack.client("bob")
    # Sent at once from several lanes' worth of callers: some are refused at first.
    results = await asyncio.gather(*(alice.send(f"m{i}", to="bob", timeout=30) for i in range(8)))
    assert [r.seq for r in results] == list(range(1, 9))
    got = [await bob.next_message(timeout=20) for _ in range(8)]
    assert [m.body for m in got] == [f"m{i}" for i in range(8)]
