"""Bad input gets a stable error code, loses nothing, and leaves everyone else alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from core.mqtt import Incoming, MqttLink
from protocol import MAX_BODY_CHARS, MAX_PAYLOAD_BYTES, topics

from .support.stack import Stack, stored


class Mallory:
    """A stock MQTT client that publishes whatever bytes a test gives it."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack = stack
        self.name = name
        self.errors: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self.receipts: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self.link: MqttLink | None = None

    def _on_message(self, m: Incoming) -> None:
        if m.topic == topics.down_error(self.name):
            self.errors.put_nowait(json.loads(m.payload))
        elif m.topic == topics.down_receipt(self.name):
            self.receipts.put_nowait(json.loads(m.payload))

    async def start(self) -> None:
        self.link = await self.stack.raw(self.name, on_message=self._on_message)
        await self.link.subscribe(topics.down_all(self.name), qos=1)

    async def publish(self, payload: bytes, kind: str = "msg") -> None:
        assert self.link is not None
        await self.link.publish(f"chat/v1/u/{self.name}/up/{kind}", payload, qos=1)

    async def error(self) -> dict[str, object]:
        return await asyncio.wait_for(self.errors.get(), 15)


def msg(**fields: object) -> bytes:
    return json.dumps(fields).encode()


CASES: list[tuple[str, Callable[[str], bytes], str, str, str | None]] = [
    # (name, payload to the recipient named, uplink kind, expected code, expected id)
    (
        "invalid json",
        lambda bob: b'{"id": "x1", "to": "%s", "body": ' % bob.encode(),
        "msg",
        "invalid_json",
        None,
    ),
    (
        "invalid utf-8",
        lambda bob: b'{"id":"x2","to":"%s","body":"\xff\xfe"}' % bob.encode(),
        "msg",
        "invalid_utf8",
        None,
    ),
    ("not an object", lambda bob: b'["to", "%s"]' % bob.encode(), "msg", "invalid_payload", None),
    ("missing body", lambda bob: msg(id="x3", to=bob), "msg", "invalid_payload", "x3"),
    ("wrong type", lambda bob: msg(id="x4", to=bob, body=5), "msg", "invalid_payload", "x4"),
    ("id not a string", lambda bob: msg(id=7, to=bob, body="hi"), "msg", "invalid_payload", None),
    (
        "both targets",
        lambda bob: msg(id="x5", to=bob, conversation="c_1", body="hi"),
        "msg",
        "invalid_payload",
        "x5",
    ),
    (
        "bad username",
        lambda bob: msg(id="x6", to="Bob/#", body="hi"),
        "msg",
        "invalid_payload",
        "x6",
    ),
    (
        "unknown recipient",
        lambda bob: msg(id="x7", to="nobody", body="hi"),
        "msg",
        "unknown_recipient",
        "x7",
    ),
    (
        "not my conversation",
        lambda bob: msg(id="x8", conversation="c_00000000000000000000", body="hi"),
        "msg",
        "unknown_conversation",
        "x8",
    ),
    (
        "body too large",
        lambda bob: msg(id="x9", to=bob, body="a" * (MAX_BODY_CHARS + 1)),
        "msg",
        "body_too_large",
        "x9",
    ),
    (
        "payload too large",
        lambda bob: msg(id="x10", to=bob, body="a", pad="p" * MAX_PAYLOAD_BYTES),
        "msg",
        "payload_too_large",
        None,
    ),
    (
        "unknown uplink kind",
        lambda bob: msg(id="x11", to=bob, body="hi"),
        "shout",
        "unknown_topic",
        None,
    ),
    (
        "a level under a known kind",
        lambda bob: msg(id="x12", to=bob, body="hi"),
        "msg/x",
        "unknown_topic",
        None,
    ),
    ("an empty kind", lambda bob: msg(id="x13", to=bob, body="hi"), "", "unknown_topic", None),
    (
        "ack for a conversation not mine",
        lambda bob: msg(conversation="c_1", read=3),
        "ack",
        "unknown_conversation",
        None,
    ),
    ("ack without a cursor", lambda bob: msg(conversation="c_1"), "ack", "invalid_payload", None),
    (
        "typing somewhere not mine",
        lambda bob: msg(conversation="c_1"),
        "typing",
        "unknown_conversation",
        None,
    ),
]


@pytest.mark.parametrize(
    ("payload", "kind", "code", "message_id"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_bad_uplink_gets_its_error_code(
    shared_stack: Stack,
    payload: Callable[[str], bytes],
    kind: str,
    code: str,
    message_id: str | None,
) -> None:
    stack = shared_stack
    mallory_name, bob = await stack.new_users("mallory", "bob")
    mallory = Mallory(stack, mallory_name)
    await mallory.start()

    await mallory.publish(payload(bob), kind)

    error = await mallory.error()
    assert error["code"] == code
    assert error.get("id") == message_id
    assert isinstance(error["detail"], str)
    assert error["detail"]
    assert stored(stack, mallory_name, bob) == []
    # The bridge is still there for the offender too.
    await mallory.publish(msg(id="ok", to=bob, body="sorry"))
    receipt = await asyncio.wait_for(mallory.receipts.get(), 15)
    assert (receipt["status"], receipt["id"]) == ("sent", "ok")


async def test_a_reused_id_with_other_content_is_refused(shared_stack: Stack) -> None:
    """An id names one message: other text under it is refused, the same text is a resend."""
    stack = shared_stack
    mallory_name, bob, carol = await stack.new_users("mallory", "bob", "carol")
    mallory = Mallory(stack, mallory_name)
    await mallory.start()

    await mallory.publish(msg(id="r1", to=bob, body="first"))
    first = await asyncio.wait_for(mallory.receipts.get(), 15)
    for reused in (
        msg(id="r1", to=bob, body="second"),
        msg(id="r1", to=carol, body="first"),
        msg(id="r1", conversation="c_00000000000000000000", body="first"),
    ):
        await mallory.publish(reused)
        error = await mallory.error()
        assert (error["code"], error["id"]) == ("id_reused", "r1")
    await mallory.publish(msg(id="r1", to=bob, body="first"))
    again = await asyncio.wait_for(mallory.receipts.get(), 15)

    assert first["status"] == again["status"] == "sent"
    assert (again["id"], again["conversation"], again["seq"]) == (
        "r1",
        first["conversation"],
        first["seq"],
    )
    assert [(m.client_id, m.body) for m in stored(stack, mallory_name, bob, carol)] == [
        ("r1", "first")
    ]
    assert mallory.errors.empty()


async def test_bad_input_does_not_disturb_other_users(shared_stack: Stack) -> None:
    stack = shared_stack
    mallory_name, alice_name, bob_name = await stack.new_users("mallory", "alice", "bob")
    alice = await stack.client(alice_name)
    bob = await stack.client(bob_name)
    mallory = Mallory(stack, mallory_name)
    await mallory.start()
    rounds = 30

    async def chat() -> None:
        for i in range(rounds):
            await alice.send(f"ping {i}", to=bob_name, timeout=30)
            got = await bob.next_message(timeout=30)
            assert got.body == f"ping {i}"

    async def attack() -> None:
        for _ in range(rounds):
            for _, payload, kind, _, _ in CASES:
                await mallory.publish(payload(bob_name), kind)

    await asyncio.gather(chat(), attack())

    codes = []
    for _ in range(rounds * len(CASES)):
        codes.append((await mallory.error())["code"])
    assert sorted(set(codes)) == sorted({case[3] for case in CASES})
    stored_here = stored(stack, mallory_name, alice_name, bob_name)
    assert [m.sender for m in stored_here] == [alice_name] * rounds


async def test_payload_over_the_broker_limit(shared_stack: Stack) -> None:
    """Above the broker's own limit only the embedded broker lets it reach the bridge.

    mosquitto drops a publish over ``message_size_limit`` (twice the bridge's limit)
    without telling an MQTT 3.1.1 client; the SDK refuses to send one at all. Either
    way nothing is stored and the connection and the bridge keep working.
    """
    stack = shared_stack
    mallory_name, bob = await stack.new_users("mallory", "bob")
    mallory = Mallory(stack, mallory_name)
    await mallory.start()
    huge = msg(id="big", to=bob, body="a", pad="p" * (3 * MAX_PAYLOAD_BYTES))

    await mallory.publish(huge)
    await mallory.publish(msg(id="after", to=bob, body="small"))

    receipt = await asyncio.wait_for(mallory.receipts.get(), 15)
    assert receipt["id"] == "after"
    if stack.mosquitto is None:
        assert (await mallory.error())["code"] == "payload_too_large"
    else:
        assert mallory.errors.empty()
    assert [m.client_id for m in stored(stack, mallory_name, bob)] == ["after"]
