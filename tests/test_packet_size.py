"""The embedded broker refuses a packet over its maximum before reading its body.

amqtt 0.12.1 believed the remaining length a client announced: a CONNECT announcing
268 MB was accepted and left open, and a PUBLISH announcing 64 MB was buffered as it
came (amqtt reads a publish's payload in one ``readexactly``), so each such
connection could hold as much of the broker's memory as it cared to send. Now the fixed
header alone decides: over ``MQCHAT_BROKER_MAX_PACKET_BYTES`` the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from .support.packets import string, varint
from .support.raw import Raw, dial, login
from .support.stack import Stack

MIB = 1024 * 1024


def rss_bytes(stack: Stack) -> int:
    assert stack.embedded_broker is not None
    assert stack.embedded_broker.process is not None
    status = Path(f"/proc/{stack.embedded_broker.process.pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(line.split()[1]) * 1024


async def offer(raw: Raw, total: int) -> int:
    """Send up to ``total`` bytes in 64 KiB pieces (at most 10 s); how many went out."""
    sent = 0
    chunk = b"x" * 65536
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    with contextlib.suppress(ConnectionError, TimeoutError):
        while sent < total and loop.time() < deadline:
            raw.writer.write(chunk)
            await asyncio.wait_for(raw.writer.drain(), 2)
            sent += len(chunk)
    return sent


async def test_a_connect_announcing_268_mb_is_closed_at_once(embedded: Stack) -> None:
    held: list[Raw] = []
    raw = await dial(embedded, held)
    before = rss_bytes(embedded)
    started = asyncio.get_running_loop().time()
    await raw.send(bytes([0x10]) + varint(268_435_455) + b"\x00\x04MQTT\x04\x02" + b"x" * 4096)
    outcome = await raw.until_closed(timeout=3)
    took = asyncio.get_running_loop().time() - started
    sent = await offer(raw, 16 * MIB)  # what it could still push: nothing read of it
    grown = rss_bytes(embedded) - before
    print(f"268 MB CONNECT: {outcome} after {took:.3f} s, {sent} more bytes sent, RSS +{grown}")
    assert outcome == "closed"
    assert grown < 4 * MIB
    assert embedded.embedded_broker is not None
    assert "Traceback" not in embedded.embedded_broker.log_text()
    raw.close()


async def test_a_publish_over_the_maximum_closes_that_client_only(embedded: Stack) -> None:
    await embedded.add_users("mallory", "alice", "bob")
    alice = await embedded.client("alice")
    bob = await embedded.client("bob")
    held: list[Raw] = []
    raw = await dial(embedded, held)
    await raw.send(login("mallory", "mallory:raw-big"))
    assert await raw.answer() == "CONNACK 0"
    before = rss_bytes(embedded)
    topic = string(b"chat/v1/u/mallory/up/msg")
    await raw.send(bytes([0x30]) + varint(64 * MIB) + topic)
    sent = await offer(raw, 16 * MIB)
    outcome = await raw.until_closed(timeout=5)
    grown = rss_bytes(embedded) - before
    print(f"64 MB PUBLISH: {sent} bytes sent, {outcome}, RSS +{grown} bytes")
    assert outcome == "closed"
    assert grown < 4 * MIB
    raw.close()

    # The largest publish mosquitto.conf accepts (a 64 KiB payload) still passes.
    link = await embedded.raw("mallory")
    await asyncio.wait_for(link.publish("chat/v1/u/mallory/up/typing", b"x" * 65536), 10)
    # Others keep chatting.
    await alice.send("still here", to="bob", timeout=20)
    assert (await bob.next_message(timeout=20)).body == "still here"
    assert embedded.embedded_broker is not None
    assert "Traceback" not in embedded.embedded_broker.log_text()
