"""Sessions per user on the embedded broker (MQCHAT_BROKER_MAX_SESSIONS_PER_USER).

amqtt keeps a persistent session (about 27 KB, its subscriptions, and a queue) for 30
days after its client leaves; a user could leave thousands (``mallory:1..N``: 300 cost
8 MB), each holding a copy of every message to them. mosquitto has no such setting (a
session costs it under 1 KB, and its queues are bounded too), so this is the embedded
broker's alone.
"""

from __future__ import annotations

import asyncio

import pytest

from .support.packets import connect, subscribe
from .support.raw import Raw, dial
from .support.stack import Stack, password_of

LIMIT = 3


@pytest.fixture
def embedded_broker_env() -> dict[str, str]:
    return {"MQCHAT_BROKER_MAX_SESSIONS_PER_USER": str(LIMIT)}


async def _connack(raw: Raw) -> tuple[bool, int]:
    """The CONNACK's session-present flag and return code."""
    head = await asyncio.wait_for(raw.reader.readexactly(4), 10)
    assert head[0] == 0x20, head
    return bool(head[2] & 1), head[3]


async def _persistent(stack: Stack, held: list[Raw], client_id: str) -> tuple[bool, int]:
    raw = await dial(stack, held)
    await raw.send(
        connect(client_id.encode(), b"mallory", password_of("mallory").encode(), clean=False)
    )
    return await _connack(raw)


async def test_the_oldest_idle_session_makes_room_and_live_ones_are_kept(
    embedded: Stack,
) -> None:
    await embedded.add_users("mallory")
    held: list[Raw] = []
    try:
        for n in range(1, LIMIT + 1):  # three sessions, left subscribed
            assert await _persistent(embedded, held, f"mallory:{n}") == (False, 0)
            await held[-1].send(subscribe([b"chat/v1/u/mallory/down/#"], qos=1))
            assert await held[-1].answer() == "SUBACK"
            held[-1].close()
            assert await held[-1].until_closed() == "closed"

        # A fourth ends the oldest one away (mallory:1) and stays connected.
        assert await _persistent(embedded, held, "mallory:4") == (False, 0)
        # mallory:1 starts over (making room again, from mallory:2); mallory:3 was kept.
        assert await _persistent(embedded, held, "mallory:1") == (False, 0)
        assert await _persistent(embedded, held, "mallory:3") == (True, 0)
        # Three connected: a fifth is refused, and ends none of them.
        assert await _persistent(embedded, held, "mallory:5") == (False, 3)
        assert embedded.embedded_broker is not None
        assert "Traceback" not in embedded.embedded_broker.log_text()
        still = held[-2]  # mallory:3
        await still.send(bytes([0xC0, 0]))
        assert await still.answer() == "PINGRESP"
    finally:
        for raw in held:
            raw.close()
