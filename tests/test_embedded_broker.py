"""The embedded broker (amqtt) under subscription churn: live deliveries keep flowing.

amqtt 0.12.1 walks its subscription table while awaiting the ACL check of each
subscriber; a client subscribing or leaving at that moment changed the table under
the walk ("dictionary changed size during iteration") and that broadcast reached no
one. Devices come and go all the time, so on a busy broker this lost live messages
(history still had them). ``broker.embedded`` gives amqtt a table that iterates
over a snapshot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clients.mqtt import Incoming
from protocol import topics

from .conftest import Stack, _embedded_stack

MESSAGES = 150


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = await _embedded_stack(tmp_path)
    try:
        yield stack
    finally:
        await stack.close()


async def test_live_delivery_survives_subscription_churn(embedded: Stack) -> None:
    await embedded.add_users("alice", "bob", "carol")
    received: list[str] = []
    all_in = asyncio.Event()

    def on_bob(m: Incoming) -> None:
        received.append(json.loads(m.payload)["body"])
        if len(received) == MESSAGES:
            all_in.set()

    bob = await embedded.raw("bob", on_message=on_bob)
    await bob.subscribe(topics.down("bob", "msg"), qos=1)
    alice = await embedded.client("alice")

    async def churn(worker: int) -> int:
        rounds = 0
        while not all_in.is_set() and rounds < 400:
            link = await embedded.raw("carol", client_id=f"carol:churn-{worker}-{rounds}")
            await link.subscribe(topics.down_all("carol"), qos=1)
            await link.subscribe(topics.presence("+"), qos=0)
            await link.close()
            rounds += 1
        return rounds

    churners = [asyncio.create_task(churn(w)) for w in range(6)]
    for i in range(MESSAGES):
        await alice.send(f"m{i}", to="bob", timeout=20)
    await asyncio.wait_for(all_in.wait(), 30)
    rounds = await asyncio.gather(*churners)

    assert sum(rounds) > 20, "the churn did not overlap the messages"
    assert received == [f"m{i}" for i in range(MESSAGES)]
    assert embedded.embedded_broker is not None
    assert "changed size during iteration" not in embedded.embedded_broker.log_text()
