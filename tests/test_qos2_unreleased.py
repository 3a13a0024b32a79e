"""QoS 2 messages never released: what a client can make the broker hold, on both brokers.

A broker keeps a QoS 2 PUBLISH from PUBREC until the client's PUBREL. amqtt 0.12.1 kept
every one a client sent, up to 65,535 per connection of up to
MQCHAT_BROKER_MAX_PACKET_BYTES each (over 8 GB); here 1,000 of 60 KB grew it by 66 MB.
mosquitto holds at most max_inflight_messages (100) and drops the rest; the embedded
broker now closes a connection over MQCHAT_BROKER_MAX_UNRELEASED_MESSAGES (100).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from .support.packets import publish
from .support.raw import Raw, dial, login
from .support.stack import Stack

MIB = 1024 * 1024
UNRELEASED = 1000
PAYLOAD = b"x" * 60_000  # under mosquitto.conf's message_size_limit


def broker_rss(stack: Stack) -> int:
    if stack.embedded_broker is not None:
        assert stack.embedded_broker.process is not None
        pid = stack.embedded_broker.process.pid
    else:
        assert stack.mosquitto is not None
        assert stack.mosquitto.child.process is not None
        pid = stack.mosquitto.child.process.pid
    status = Path(f"/proc/{pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(line.split()[1]) * 1024


async def test_unreleased_qos2_messages_are_bounded(stack: Stack) -> None:
    await stack.add_users("mallory", "alice", "bob")
    alice = await stack.client("alice")
    bob = await stack.client("bob")
    held: list[Raw] = []
    try:
        raw = await dial(stack, held)
        await raw.send(login("mallory", "mallory:raw-qos2"))
        assert await raw.answer() == "CONNACK 0"
        before = broker_rss(stack)
        for packet_id in range(1, UNRELEASED + 1):  # never a PUBREL
            await raw.send(
                publish(b"chat/v1/u/mallory/up/typing", PAYLOAD, qos=2, packet_id=packet_id)
            )
        # The broker has read them all once it answers a PINGREQ sent after them (or has
        # closed the connection on the way).
        await raw.send(bytes([0xC0, 0]))
        outcome = await raw.until_closed(timeout=5)
        grown = broker_rss(stack) - before
        print(f"{UNRELEASED} unreleased QoS 2 of 60 KB: {outcome}, RSS +{grown / MIB:.1f} MB")
        assert grown < 20 * MIB
        if stack.embedded_broker is not None:
            assert outcome == "closed"
            assert "Traceback" not in stack.embedded_broker.log_text()

        # Others keep chatting, and mallory may connect again and publish at QoS 2.
        await alice.send("still here", to="bob", timeout=20)
        assert (await bob.next_message(timeout=20)).body == "still here"
        link = await stack.raw("mallory")
        await asyncio.wait_for(link.publish("chat/v1/u/mallory/up/typing", b"{}", qos=2), 10)
    finally:
        for raw in held:
            raw.close()
