"""The SDK resends a message without a ``sent`` receipt, backing off while nobody answers."""

from __future__ import annotations

import asyncio
import itertools
import time

from core.mqtt import Incoming
from protocol import topics

from .support.stack import Stack, stored


async def test_resends_back_off_while_the_bridge_is_away_then_the_message_lands_once(
    stack: Stack,
) -> None:
    await stack.add_users("alice", "bob")
    alice = await stack.client("alice", resend_after=0.2)
    await asyncio.to_thread(stack.bridge.stop)

    # Watch alice's uplinks the way the bridge would (its account, another client id).
    copies: list[float] = []
    enough = asyncio.Event()

    def on_uplink(_: Incoming) -> None:
        copies.append(time.monotonic())
        if len(copies) == 6:
            enough.set()

    watcher = await stack.raw(
        "mqchat-bridge",
        stack.bridge_settings.password.get_secret_value(),
        client_id="mqchat-bridge-watch",
        on_message=on_uplink,
    )
    await watcher.subscribe(topics.up_msg("alice"), qos=1)

    sending = asyncio.create_task(alice.send("are you there?", to="bob", timeout=60))
    await asyncio.wait_for(enough.wait(), 30)
    gaps = [b - a for a, b in itertools.pairwise(copies)]
    # Without backoff: a copy every 0.2 s. With it: 0.2, 0.4, 0.8, 1.6, 1.6 (x 0.8-1).
    assert gaps[3] > 3 * gaps[0], gaps
    assert all(gap < 1.6 * 2 for gap in gaps), gaps  # capped at 8 x resend_after

    await asyncio.to_thread(stack.start_bridge)
    sent = await sending
    assert [m.client_id for m in stored(stack)] == [sent.id]
