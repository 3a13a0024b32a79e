"""Keepalive on both brokers: a connection that goes silent is closed after 1.5 keepalives.

amqtt 0.12.1 never enforced it: a device whose network vanished (no FIN, no RST: a
half-open connection, here a stalled proxy) stayed online for good and its last will
never fired, and a client that trickled a packet a byte at a time held its connection
forever. mosquitto closes both (MQTT-3.1.2-24).
"""

from __future__ import annotations

import asyncio

from .support.clients import watching
from .support.packets import packet, publish, string, varint
from .support.raw import Raw, dial, login
from .support.stack import Stack
from .support.tcp_proxy import TcpProxy

#: What the raw clients here ask for; the brokers must close after 3 s of silence.
KEEPALIVE = 2
#: Bound of every wait for a close: mosquitto checks keepalives every few seconds.
CLOSE_WITHIN = 12.0


def _with_keepalive(connect: bytes, keepalive: int) -> bytes:
    """The CONNECT from ``login`` with another keepalive (bytes 10-11 of its body)."""
    head = 2  # fixed header: type and a one-byte remaining length
    at = head + 2 + 4 + 2  # protocol name (length + "MQTT"), level, flags
    return connect[:at] + keepalive.to_bytes(2, "big") + connect[at + 2 :]


async def test_a_half_open_connection_goes_offline_by_its_last_will(stack: Stack) -> None:
    watcher = await watching(stack, "alice")
    async with TcpProxy(stack.host, stack.port) as proxy:
        await stack.client("alice", port=proxy.port, keepalive=KEEPALIVE)
        await watcher.state_of("alice", "online")

        proxy.stall()  # the phone's network is gone: no FIN, no RST, no bytes
        await watcher.state_of("alice", "offline", timeout=CLOSE_WITHIN)


async def test_silent_and_trickling_connections_are_closed(stack: Stack) -> None:
    await stack.add_users("mallory")
    held: list[Raw] = []
    try:
        silent = await dial(stack, held)
        await silent.send(_with_keepalive(login("mallory", "mallory:silent"), KEEPALIVE))
        trickling = await dial(stack, held)
        await trickling.send(_with_keepalive(login("mallory", "mallory:trickle"), KEEPALIVE))
        pinging = await dial(stack, held)
        await pinging.send(_with_keepalive(login("mallory", "mallory:pinging"), KEEPALIVE))
        for raw in (silent, trickling, pinging):
            assert await raw.answer() == "CONNACK 0"

        # A PUBLISH of 100 bytes, of which a byte a second arrives after its start.
        start = bytes([0x30]) + varint(100) + string(b"chat/v1/u/mallory/up/typing")
        await trickling.send(start)

        async def trickle() -> None:
            for _ in range(int(CLOSE_WITHIN)):
                await asyncio.sleep(1)
                await trickling.send(b"x")

        async def ping() -> None:
            # The control: a client that keeps its keepalive is never closed.
            for _ in range(int(CLOSE_WITHIN)):
                await asyncio.sleep(1)
                await pinging.send(packet(0xC0, b""))

        trickler = asyncio.create_task(trickle())
        pinger = asyncio.create_task(ping())
        outcomes = await asyncio.gather(
            silent.until_closed(timeout=CLOSE_WITHIN),
            trickling.until_closed(timeout=CLOSE_WITHIN),
        )
        assert outcomes == ["closed", "closed"]
        trickler.cancel()
        await asyncio.gather(trickler, return_exceptions=True)
        await pinger
        # Still served: its PINGs were answered, and a publish gets its PUBACK now.
        await pinging.send(publish(b"chat/v1/u/mallory/up/typing", b"{}", qos=1, packet_id=7))
        async with asyncio.timeout(5):
            while (head := await pinging.reader.readexactly(2))[0] >> 4 == 13:  # PINGRESP
                pass
        assert head == bytes([0x40, 2])  # PUBACK
    finally:
        for raw in held:
            raw.close()
