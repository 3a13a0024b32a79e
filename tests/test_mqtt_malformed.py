"""Malformed MQTT packets by raw socket, against amqtt and mosquitto.

Each case opens a TCP connection of its own and sends bytes no MQTT library would:
truncated packets, a remaining length of 256 MB, invalid UTF-8 in topics and client
ids, empty and 64 KB client ids, subscriptions with thousands of filters or thousands
of levels, PUBLISH before CONNECT, a second CONNECT, reserved packet types, garbage.
After every case the broker process is still running, a new authenticated client
can connect, and alice's next message reaches bob through the bridge. What each
broker answered is recorded in ``docs/security.md``.

Some cases leave their connection open (a slow client that never finishes its
packet, a client holding thousands of subscriptions) while the others run, so a
broker that serves one connection at a time, or stalls on one, fails here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mqchat import ChatClient

from .support.packets import connect, packet, publish, string, subscribe, varint
from .support.raw import Raw, dial, login
from .support.stack import Stack, password_of


def subscribe_in_parts(filters: list[bytes], first_packet_id: int) -> bytes:
    """SUBSCRIBE packets of 1,000 filters each: one packet of thousands would be over
    the embedded broker's MQCHAT_BROKER_MAX_PACKET_BYTES (tests/test_packet_size.py)."""
    return b"".join(
        subscribe(filters[start : start + 1000], packet_id=first_packet_id + start // 1000)
        for start in range(0, len(filters), 1000)
    )


# -- the cases ---------------------------------------------------------------------------
# Each sends its bytes and returns, still unawaited, how it watches the broker's answer,
# so the (up to 3 s) waits of all cases overlap while the chat checks run.


async def then(connack: str, outcome: Awaitable[str]) -> str:
    return f"{connack}, then {await outcome}"


Case = Callable[[Stack, list[Raw]], Awaitable[Awaitable[str]]]


async def logged_in(stack: Stack, held: list[Raw], client_id: str) -> tuple[Raw, str]:
    """A connection signed in as mallory, and the broker's answer to its CONNECT."""
    raw = await dial(stack, held)
    await raw.send(login("mallory", client_id))
    return raw, await raw.answer()


async def garbage(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(bytes(range(256)) * 8)
    return raw.until_closed()


async def truncated_connect_then_close(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(login("mallory")[:9])
    raw.writer.write_eof()
    return raw.until_closed()


async def truncated_connect_held_open(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(login("mallory")[:9])
    return raw.answer(timeout=1.0)


async def huge_remaining_length(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(bytes([0x10]) + varint(268_435_455) + b"\x00\x04MQTT\x04\x02" + b"x" * 4096)
    return raw.answer(timeout=1.0)


async def huge_remaining_length_after_login(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw, connack = await logged_in(stack, held, "mallory:raw-huge")
    await raw.send(bytes([0x30]) + varint(268_435_455) + string(b"chat/v1/u/mallory/up/msg"))
    return then(connack, raw.answer(timeout=1.0))


async def malformed_remaining_length(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(bytes([0x10]) + b"\xff\xff\xff\xff\xff\x01" + b"x" * 64)
    return raw.until_closed()


async def publish_before_connect(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(publish(b"chat/v1/u/bob/down/msg", b'{"id":"x"}'))
    return raw.until_closed()


async def reserved_type_0(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(packet(0x00, b""))
    return raw.until_closed()


async def reserved_type_15_after_login(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw, connack = await logged_in(stack, held, "mallory:raw-15")
    await raw.send(packet(0xF0, b"\x00\x00"))
    return then(connack, raw.until_closed())


async def second_connect(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw, connack = await logged_in(stack, held, "mallory:raw-second")
    await raw.send(login("mallory", "mallory:raw-second"))
    return then(connack, raw.until_closed())


async def invalid_utf8_client_id(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(connect(b"\xff\xfe\xc3", b"mallory", password_of("mallory").encode()))
    return raw.answer()


async def invalid_utf8_username(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(connect(b"u8-user", b"mal\xfflory", b"whatever-pw"))
    return raw.answer()


async def empty_client_id_persistent(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(connect(b"", b"mallory", password_of("mallory").encode(), clean=False))
    return raw.answer()


async def oversized_client_id(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw = await dial(stack, held)
    await raw.send(connect(b"m" * 65535, b"mallory", password_of("mallory").encode()))
    return raw.answer()


async def invalid_utf8_topic(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw, connack = await logged_in(stack, held, "mallory:raw-utf8")
    await raw.send(publish(b"chat/v1/u/mallory/up/\xff\xfe", b'{"id":"u","to":"bob","body":"x"}'))
    await raw.send(publish(b"chat/v1/u/mallory/up/ms\x00g", b"{}", qos=1, packet_id=2))
    return then(connack, raw.until_closed())


async def wildcard_in_publish_topic(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw, connack = await logged_in(stack, held, "mallory:raw-wild")
    await raw.send(publish(b"chat/v1/u/+/down/msg", b'{"id":"w"}', qos=1, packet_id=3))
    return then(connack, raw.until_closed())


async def thousands_of_filters(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    """5,000 filters the ACL allows (all under mallory's own down/), kept subscribed."""
    raw, connack = await logged_in(stack, held, "mallory:raw-many")
    filters = [f"chat/v1/u/mallory/down/x{i}/+/#".encode() for i in range(5000)]
    await raw.send(subscribe_in_parts(filters, first_packet_id=10))
    return then(connack, raw.answer(timeout=15))


async def very_deep_filters(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    """10,000-level filters, one allowed (under mallory's down/) and one refused."""
    raw, connack = await logged_in(stack, held, "mallory:raw-deep")
    deep = b"+/" * 10_000 + b"#"
    await raw.send(subscribe([b"chat/v1/u/mallory/down/" + deep, deep], packet_id=8))
    return then(connack, raw.answer(timeout=15))


async def thousands_of_refused_filters(stack: Stack, held: list[Raw]) -> Awaitable[str]:
    raw, connack = await logged_in(stack, held, "mallory:raw-refused")
    filters = [b"+/" * (i % 50) + b"#" for i in range(3000)] + [b"$SYS/#", b"#"]
    await raw.send(subscribe_in_parts(filters, first_packet_id=20))
    return then(connack, raw.answer(timeout=15))


CASES: list[Case] = [
    garbage,
    truncated_connect_then_close,
    truncated_connect_held_open,
    huge_remaining_length,
    huge_remaining_length_after_login,
    malformed_remaining_length,
    publish_before_connect,
    reserved_type_0,
    reserved_type_15_after_login,
    second_connect,
    invalid_utf8_client_id,
    invalid_utf8_username,
    empty_client_id_persistent,
    oversized_client_id,
    invalid_utf8_topic,
    wildcard_in_publish_topic,
    thousands_of_filters,
    very_deep_filters,
    thousands_of_refused_filters,
]


def broker_alive(stack: Stack) -> bool:
    if stack.mosquitto is not None:
        return stack.mosquitto.is_running
    assert stack.embedded_broker is not None
    process = stack.embedded_broker.process
    return process is not None and process.poll() is None


async def still_chatting(stack: Stack, alice: ChatClient, bob: ChatClient, n: int) -> None:
    link = await stack.raw("carol")  # a new authenticated connection is accepted
    await link.close()
    await alice.send(f"after case {n}", to="bob", timeout=20)
    got = await bob.next_message(timeout=20)
    assert got.body == f"after case {n}"


async def test_malformed_packets_leave_the_broker_serving(stack: Stack) -> None:
    await stack.add_users("mallory", "alice", "bob", "carol")
    alice = await stack.client("alice")
    bob = await stack.client("bob")
    held: list[Raw] = []
    watching: dict[str, asyncio.Future[str]] = {}
    outcomes: dict[str, str] = {}
    try:
        for n, case in enumerate(CASES):
            watching[case.__name__] = asyncio.ensure_future(await case(stack, held))
            assert broker_alive(stack), f"{stack.name} broker died after {case.__name__}"
            try:
                await still_chatting(stack, alice, bob, n)
            except Exception as exc:
                raise AssertionError(f"{stack.name}: no chat after {case.__name__}") from exc
        for name, watch in watching.items():
            outcomes[name] = await watch
        assert broker_alive(stack)
        await still_chatting(stack, alice, bob, len(CASES))
    finally:
        for watch in watching.values():
            watch.cancel()
        for raw in held:
            raw.close()
        print(f"\n{stack.name}:")
        for name, outcome in outcomes.items():
            print(f"  {name}: {outcome}")
    # What each broker does with the connection (docs/security.md has the table).
    closes = {
        "malformed_remaining_length",
        "second_connect",
        "garbage",
        "truncated_connect_then_close",
        "publish_before_connect",
        "reserved_type_0",
    }
    if stack.mosquitto is None:
        # Over MQCHAT_BROKER_MAX_PACKET_BYTES, before or after login.
        closes |= {"huge_remaining_length", "huge_remaining_length_after_login"}
    else:
        closes |= {
            "reserved_type_15_after_login",
            "invalid_utf8_client_id",
            "invalid_utf8_topic",
            "wildcard_in_publish_topic",
            "very_deep_filters",
        }
    for name in closes:
        assert outcomes[name].endswith("closed"), (stack.name, name, outcomes[name])
    assert outcomes["empty_client_id_persistent"] == "CONNACK 2"  # identifier rejected
    assert outcomes["oversized_client_id"] == "CONNACK 5"  # not bound to the user
    assert outcomes["thousands_of_filters"] == "CONNACK 0, then SUBACK"
