"""A flooder is stopped at the broker, on both brokers: over the per-user publish
quota its publishes are dropped before they reach the bridge, and a user that keeps
flooding is disconnected; others keep chatting.

The quota is lowered here (5 a second, bursts of 20) so that a test-sized flood meets
it; the defaults (100 a second, bursts of 50) are the production config's.
"""

from __future__ import annotations

import asyncio
import json
import time

from protocol import topics

from .support.services import wait_until
from .support.stack import Stack, stored

RATE = 5
BURST = 20
FLOOD = 400


async def test_a_flood_is_dropped_at_the_broker_and_the_flooder_cut_off(stack: Stack) -> None:
    await asyncio.to_thread(stack.set_publish_quota, RATE, BURST)
    await stack.add_users("mallory", "alice", "bob")
    alice = await stack.client("alice")
    bob = await stack.client("bob")
    mallory = await stack.raw("mallory")
    generation = mallory.generation

    started = time.monotonic()
    for i in range(FLOOD):
        payload = json.dumps({"id": f"f{i}", "to": "bob", "body": "spam"}).encode()
        mallory.publish(topics.up_msg("mallory"), payload, qos=1)
    # Over twice the rate for longer than its patience: the broker cuts it off. The link
    # connects again by itself and resends what it had in flight, which gets it cut off
    # again while the user's buckets are empty: a new connection is the proof.
    await asyncio.to_thread(
        wait_until, lambda: mallory.generation > generation, timeout=30, what="a cut-off"
    )
    await mallory.close()
    flooded_for = time.monotonic() - started

    # alice chats through it. Her message reaches the bridge after everything the
    # broker relayed of mallory's, so once it is stored nothing more of his is coming.
    await alice.send("still here", to="bob", timeout=20)
    assert (await bob.next_message(timeout=20)).body in {"spam", "still here"}
    senders = [m.sender for m in stored(stack)]
    # The burst, what the rate refilled meanwhile, and the slack of one refill.
    assert BURST <= senders.count("mallory") <= BURST + RATE * (flooded_for + 1)
    assert senders.count("alice") == 1
    log = (
        stack.mosquitto.log_path.read_text()
        if stack.mosquitto is not None
        else stack.embedded_broker.log_text()  # type: ignore[union-attr]
    )
    assert "over its publish quota" in log
    assert "Traceback" not in log


async def test_an_honest_burst_within_the_quota_goes_through(stack: Stack) -> None:
    await asyncio.to_thread(stack.set_publish_quota, RATE, BURST)
    await stack.add_users("alice", "bob")
    alice = await stack.raw("alice")
    generation = alice.generation
    for i in range(BURST):
        payload = json.dumps({"id": f"m{i}", "to": "bob", "body": f"m{i}"}).encode()
        await alice.publish(topics.up_msg("alice"), payload, qos=1)
    sdk = await stack.client("alice", device="sdk")
    await sdk.send("sentinel", to="bob", timeout=20)
    bodies = [m.body for m in stored(stack) if m.sender == "alice"]
    assert bodies[:BURST] == [f"m{i}" for i in range(BURST)]
    assert alice.generation == generation
    assert alice.is_connected
    # The SDK acked each of alice's twenty messages as it got them (her own copies): acks
    # are not counted, so catching up on a backlog never gets a device cut off.
    assert sdk.link.generation == 1
