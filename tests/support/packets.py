"""MQTT 3.1.1 packets as bytes, for clients that must send what no library would.

The malformed-input tests send truncated and oversized packets built from these
pieces, and the connection benchmark's lean devices (``bench/_conn_client.py``) send
well-formed ones; both build them here. Plain functions over bytes, importing nothing
of mqchat, so that a benchmark worker process stays small.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14


def varint(n: int) -> bytes:
    """A remaining length (MQTT 3.1.1 2.2.3): seven bits a byte, high bit "more"."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


PINGREQ_BYTES = packet(PINGREQ << 4, b"")
DISCONNECT_BYTES = packet(DISCONNECT << 4, b"")


def connect(
    client_id: str | bytes,
    username: str | bytes | None = None,
    password: str | bytes | None = None,
    *,
    clean: bool = True,
    keepalive: int = 30,
    will_topic: str | bytes | None = None,
    will: bytes = b"",
    protocol: bytes = b"MQTT",
    level: int = 4,
) -> bytes:
    """CONNECT; a last will (QoS 1, not retained) when ``will_topic`` is given."""
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    payload = string(client_id)
    if will_topic is not None:
        flags |= (1 << 3) | 0x04
        payload += string(will_topic) + string(will)
    for field in (username, password):
        if field is not None:
            payload += string(field)
    header = string(protocol) + bytes([level, flags]) + struct.pack("!H", keepalive)
    return packet(CONNECT << 4, header + payload)


def subscribe(
    filters: Sequence[str | bytes | tuple[str | bytes, int]], packet_id: int = 1, qos: int = 0
) -> bytes:
    """SUBSCRIBE to ``filters``, each at ``qos`` unless given as ``(filter, qos)``."""
    body = struct.pack("!H", packet_id)
    for item in filters:
        topic_filter, wanted = item if isinstance(item, tuple) else (item, qos)
        body += string(topic_filter) + bytes([wanted])
    return packet((SUBSCRIBE << 4) | 0x02, body)


def publish(
    topic: str | bytes, payload: bytes, *, qos: int = 0, packet_id: int = 1, retain: bool = False
) -> bytes:
    body = string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet((PUBLISH << 4) | (qos << 1) | (0x01 if retain else 0), body)


def puback(packet_id: bytes) -> bytes:
    """PUBACK for the two-byte packet id of a received PUBLISH."""
    return packet(PUBACK << 4, packet_id)
