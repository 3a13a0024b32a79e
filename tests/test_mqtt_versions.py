"""Which MQTT versions each broker speaks, and how the embedded one refuses the others.

amqtt 0.12.1 speaks 3.1.1 only; an MQTT 5 CONNECT got no answer at all (MQTT.js
reported "connack timeout" and reconnected every 11 s forever) and an ERROR traceback
in broker.log. Now it gets CONNACK 1 ("unacceptable protocol version") at once, and
every refusal of a client's CONNECT is one log line, never a traceback. mosquitto 2.0.11
speaks 3.1, 3.1.1 and 5.
"""

from __future__ import annotations

import asyncio
import struct

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .support.clients import paho_answer
from .support.packets import packet, string, varint
from .support.raw import Raw, dial
from .support.stack import Stack, password_of


def _connect_v5(user: str, client_id: str) -> bytes:
    """An MQTT 5 CONNECT: like 3.1.1's but level 5 and a (here empty) property list."""
    flags = 0x02 | 0x80 | 0x40
    body = string(b"MQTT") + bytes([5, flags]) + struct.pack("!H", 30) + varint(0)
    body += string(client_id.encode()) + string(user.encode())
    body += string(password_of(user).encode())
    return packet(0x10, body)


def _connect(protocol: bytes, level: int, flags: int, user: str = "mallory") -> bytes:
    body = string(protocol) + bytes([level, flags]) + struct.pack("!H", 30)
    body += string(f"{user}:versions".encode()) + string(user.encode())
    body += string(password_of(user).encode())
    return packet(0x10, body)


CREDENTIALS = 0x80 | 0x40 | 0x02
#: "will flag, no will": the fields shift (the username is read as the will topic), so
#: amqtt finds no username: not authorised.
CASES = {
    "mqtt5": _connect_v5("mallory", "mallory:v5"),
    "mqtt31": _connect(b"MQIsdp", 3, CREDENTIALS),
    "level 6": _connect(b"MQTT", 6, CREDENTIALS),
    "protocol name MQTX": _connect(b"MQTX", 4, CREDENTIALS),
    "reserved flag": _connect(b"MQTT", 4, CREDENTIALS | 0x01),
    "will flag, no will": _connect(b"MQTT", 4, CREDENTIALS | 0x04),
}

EXPECTED = {
    "embedded": {
        "mqtt5": "CONNACK 1, then closed",
        "mqtt31": "CONNACK 1, then closed",
        "level 6": "CONNACK 1, then closed",
        "protocol name MQTX": "closed",
        "reserved flag": "closed",
        "will flag, no will": "CONNACK 5, then closed",
    },
    "production": {
        "mqtt5": "CONNACK 0, then open",
        "mqtt31": "CONNACK 0, then open",
        "level 6": "CONNACK 1, then closed",
        "protocol name MQTX": "closed",
        "reserved flag": "closed",
        "will flag, no will": "closed",
    },
}


async def _outcome(stack: Stack, data: bytes, held: list[Raw]) -> str:
    raw = await dial(stack, held)
    await raw.send(data)
    first = await raw.answer()
    if not first.startswith("CONNACK"):
        return first
    return f"{first}, then {await raw.until_closed(timeout=1.0)}"


async def test_other_versions_and_bad_connects_are_refused_cleanly(stack: Stack) -> None:
    await stack.add_users("mallory")
    held: list[Raw] = []
    try:
        outcomes = dict(
            zip(
                CASES,
                await asyncio.gather(*(_outcome(stack, data, held) for data in CASES.values())),
                strict=True,
            )
        )
    finally:
        for raw in held:
            raw.close()
    assert outcomes == EXPECTED[stack.name]
    if stack.embedded_broker is not None:
        assert "Traceback" not in stack.embedded_broker.log_text()


def _paho_v5_connect(stack: Stack) -> str:
    """Connect with paho as MQTT 5; the reason it was answered with (or why not)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="mallory:paho5", protocol=paho.MQTTv5
    )
    client.username_pw_set("mallory", password_of("mallory"))
    return paho_answer(stack, client)


async def test_paho_mqtt5(stack: Stack) -> None:
    await stack.add_users("mallory")
    answer = await asyncio.to_thread(_paho_v5_connect, stack)
    if stack.mosquitto is not None:
        assert answer == "Success"
    else:
        assert answer == "Unsupported protocol version", answer
        assert stack.embedded_broker is not None
        assert "Traceback" not in stack.embedded_broker.log_text()
