"""The queue of a disconnected persistent session is bounded on both brokers.

amqtt 0.12.1 queued every message for a persistent session that was away, without
limit, for as long as the session is kept (30 days): a user who left sessions
subscribed (thousands of client ids ``alice:1..N`` cost nothing more) grew the broker
with every message addressed to them. mosquitto keeps ``max_queued_messages`` and drops
newer ones; the embedded broker now does the same (MQCHAT_BROKER_MAX_QUEUED_MESSAGES).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.mqtt import Incoming

from .support.clients import BRIDGE, connect_actor
from .support.stack import Stack, running, start_embedded_stack, start_production_stack

LIMIT = 20
OFFERED = 60


@pytest.fixture(params=["embedded", "production"])
async def limited(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "embedded":
        env = {"MQCHAT_BROKER_MAX_QUEUED_MESSAGES": str(LIMIT)}
        starting = start_embedded_stack(tmp_path, env)
    else:
        starting = start_production_stack(tmp_path, request.getfixturevalue("postgres"))
    async with running(starting) as stack:
        # mosquitto's queue is set on the running broker; amqtt's came with its settings.
        await asyncio.to_thread(stack.limit_broker_queue, LIMIT)
        yield stack


async def test_a_sessions_queue_keeps_the_oldest_up_to_the_limit(limited: Stack) -> None:
    await limited.add_users("bob")
    received: list[str] = []
    arrived = asyncio.Event()

    def on_message(message: Incoming) -> None:
        received.append(json.loads(message.payload)["n"])
        arrived.set()

    away = await limited.raw("bob", client_id="bob:queued", clean_session=False)
    await away.subscribe("chat/v1/u/bob/down/msg", qos=1)
    await away.close()

    bridge = await connect_actor(limited, BRIDGE, "sender")
    for n in range(OFFERED):
        payload = json.dumps({"n": str(n)}).encode()
        await bridge.link.publish("chat/v1/u/bob/down/msg", payload, qos=1)

    await limited.raw("bob", client_id="bob:queued", clean_session=False, on_message=on_message)
    # Sent live after bob is back: once it is in, nothing queued is still to come.
    await bridge.link.publish("chat/v1/u/bob/down/msg", b'{"n": "sentinel"}', qos=1)
    async with asyncio.timeout(20):
        while "sentinel" not in received:
            arrived.clear()
            await arrived.wait()
    assert received == [str(n) for n in range(LIMIT)] + ["sentinel"]
