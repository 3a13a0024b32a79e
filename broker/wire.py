"""What a client sends, read before amqtt acts on it: packet sizes and the CONNECT.

amqtt 0.12.1 believes a packet's announced size: a CONNECT announcing 268 MB was
accepted and read as it came, and it answers only the CONNECTs it can parse as MQTT
3.1.1 (an MQTT 5 CONNECT, whose properties it misreads, got no CONNACK at all). So::

    client bytes ──▶ PacketGuard: every fixed header; remaining length over the maximum
                       ──▶ PacketRefused, connection closed, body never read
                 ──▶ read_connect: the first packet, whole, then name, level, flags
                       MQTT 3.1 / 5 ──▶ CONNACK 1; anything else malformed ──▶ closed
                 ──▶ the gate (broker.embedded) ──▶ amqtt

amqtt 0.12.1 never enforces a client's keepalive either (its broker handler's read
timeout does nothing, and the body of a packet is read with no timeout at all), so a
connection that went silent, or trickles a packet a byte at a time, stayed open for
good and its last will never fired. PacketGuard closes it once no whole packet has
arrived for 1.5 times the keepalive the CONNECT asked for (MQTT-3.1.2-24).
"""

from __future__ import annotations

import asyncio
from typing import Final

from amqtt.adapters import BufferReader, ReaderAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader

#: CONNACK return code of MQTT 3.1.1 for a protocol level the server does not speak.
UNACCEPTABLE_PROTOCOL_VERSION: Final = 0x01

#: The protocol names of MQTT 3.1 (``MQIsdp``) and of 3.1.1 and 5 (``MQTT``).
_KNOWN_NAMES: Final = (b"MQTT", b"MQIsdp")
_SUPPORTED_LEVEL: Final = 4  # MQTT 3.1.1


class PacketRefused(Exception):
    """A packet the broker will not read further; the connection is to be closed.

    Attributes:
        return_code: the CONNACK return code to answer with first, or None for none.
    """

    def __init__(self, reason: str, return_code: int | None = None) -> None:
        super().__init__(reason)
        self.return_code = return_code


class PacketGuard(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no types
    """Passes a client's bytes through, following packet boundaries, and refuses a packet
    whose remaining length is over ``max_bytes`` as soon as its fixed header is read.

    It sits under everything that reads the connection (the gate, then amqtt), so it
    sees each byte once. amqtt reads a fixed header byte by byte and a body in pieces;
    following them costs a few comparisons per read.

    Once ``keepalive`` is set (from the CONNECT; 0 means none, as MQTT says), a read
    that would end more than 1.5 keepalives after the last whole packet refuses the
    connection instead: counting whole packets, not bytes, also ends a packet
    trickled a byte at a time.
    """

    def __init__(self, reader: ReaderAdapter, max_bytes: int) -> None:
        self._reader = reader
        self.max_bytes = max_bytes
        self.keepalive = 0
        self._last_packet = asyncio.get_running_loop().time()
        self._body_left = 0  # bytes of the current packet's body still to come
        self._in_header = False  # between a packet's first byte and its length's last
        self._length = 0
        self._length_bytes = 0

    async def read(self, n: int = -1) -> bytes:
        loop = asyncio.get_running_loop()
        if not self.keepalive:
            data: bytes = await self._reader.read(n)
        else:
            silence = 1.5 * self.keepalive
            try:
                data = await asyncio.wait_for(
                    self._reader.read(n), self._last_packet + silence - loop.time()
                )
            except TimeoutError:
                raise PacketRefused(
                    f"no whole packet for {silence:g} s, 1.5 times its keepalive"
                ) from None
        if self._follow(data):
            self._last_packet = loop.time()
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _follow(self, data: bytes) -> bool:
        """Advance over ``data``; whether a packet was completed in it."""
        completed = False
        at = 0
        while at < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - at)
                self._body_left -= step
                at += step
                completed = completed or not self._body_left
            elif not self._in_header:
                self._in_header, self._length, self._length_bytes = True, 0, 0
                at += 1  # the packet type and flags
            else:
                byte = data[at]
                at += 1
                self._length += (byte & 0x7F) << (7 * self._length_bytes)
                self._length_bytes += 1
                if byte & 0x80 and self._length_bytes == 4:
                    raise PacketRefused("malformed remaining length (more than 4 bytes)")
                if not byte & 0x80:
                    self._in_header = False
                    if self._length > self.max_bytes:
                        raise PacketRefused(
                            f"a packet of {self._length} bytes, over the maximum of "
                            f"{self.max_bytes} (MQCHAT_BROKER_MAX_PACKET_BYTES)"
                        )
                    self._body_left = self._length
                    completed = completed or not self._length
        return completed


async def read_connect(reader: ReaderAdapter) -> ConnectPacket:
    """Read the first packet whole and return it as a CONNECT amqtt can handle.

    Raises:
        PacketRefused: not a CONNECT, malformed, too large, or another MQTT version
            (``return_code`` 1: MQTT-3.1.2-2, what a 3.1.1 server answers MQTT 3.1 and 5).
    """
    try:
        header = await MQTTFixedHeader.from_stream(reader)
        if header is None:
            raise PacketRefused("closed before its CONNECT")
        if header.packet_type != CONNECT:
            raise PacketRefused(f"first packet of type {header.packet_type}, not CONNECT")
        body = await reader.read(header.remaining_length)
    except (asyncio.IncompleteReadError, NoDataError, MQTTError, OSError) as exc:
        raise PacketRefused(f"no complete CONNECT ({type(exc).__name__})") from None
    if len(body) < header.remaining_length:  # the WebSocket reader returns what it has
        raise PacketRefused("no complete CONNECT (closed)")
    _check_variable_header(body)
    try:
        connect: ConnectPacket = await ConnectPacket.from_stream(
            BufferReader(header.to_bytes() + body)
        )
    except (AMQTTError, MQTTError, NoDataError, ValueError, IndexError) as exc:
        raise PacketRefused(f"malformed CONNECT ({type(exc).__name__})") from None
    if connect.will_flag and (connect.will_topic is None or connect.will_message is None):
        raise PacketRefused("malformed CONNECT (will flag without will)")
    return connect


def _check_variable_header(body: bytes) -> None:
    name_length = int.from_bytes(body[:2], "big")
    name = body[2 : 2 + name_length]
    rest = body[2 + name_length : 4 + name_length]
    if len(rest) < 2:
        raise PacketRefused("malformed CONNECT (truncated variable header)")
    level, flags = rest
    if name not in _KNOWN_NAMES:
        # MQTT-3.1.2-1: the server may close without a CONNACK.
        raise PacketRefused(f"not MQTT (protocol name {name[:16]!r})")
    if name != b"MQTT" or level != _SUPPORTED_LEVEL:
        raise PacketRefused(
            f"MQTT protocol level {level}; this broker speaks 3.1.1 (level 4) only",
            UNACCEPTABLE_PROTOCOL_VERSION,
        )
    if flags & 0x01:
        raise PacketRefused("reserved CONNECT flag set (MQTT-3.1.2-3)")
