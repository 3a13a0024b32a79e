"""Every uplink kind is rate-limited before any database work, and a user's device
names are capped: floods of acks, typing and presence are refused cheaply, leave no
rows behind, and others keep chatting.

The bridge reports its database turns when it stops; the flood tests read that line,
so "cost no database turn" is measured, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from sqlmodel import Session

from core.mqtt import Incoming, MqttLink
from protocol import topics
from store import devices, history
from store.tables import Cursor

from .support.stack import Stack

FLOOD = 200
ALLOWED = 5


async def restart_bridge(stack: Stack, **settings: str) -> None:
    stack.bridge.stop()
    for name, value in settings.items():
        stack.bridge.env[f"MQCHAT_BRIDGE_{name.upper()}"] = value
    await asyncio.to_thread(stack.start_bridge)


def database_turns(stack: Stack) -> int:
    """Stop the bridge and read how many database turns its latest start took."""
    stack.bridge.stop()
    found = re.findall(r"in (\d+) database turns", stack.bridge.log_text())
    assert found, stack.bridge.log_text()[-2000:]
    return int(found[-1])


def device_names(stack: Stack, user: str) -> set[str]:
    with Session(stack.engine) as session:
        return devices.known(session, [user])[user]


async def listener(stack: Stack, user: str) -> tuple[MqttLink, asyncio.Queue[dict[str, Any]]]:
    """A stock client of ``user`` that hears its own ``down/error``."""
    errors: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        if m.topic == topics.down_error(user):
            errors.put_nowait(json.loads(m.payload))

    link = await stack.raw(user, on_message=on_message)
    await link.subscribe(topics.down_error(user), qos=1)
    return link, errors


def flood_payloads(kind: str, conversation: str) -> list[bytes]:
    """FLOOD uplinks of ``kind``, each with a name the server has never seen."""
    if kind == "typing":
        return [json.dumps({"conversation": f"nope-{i}"}).encode() for i in range(FLOOD)]
    if kind == "presence":
        return [json.dumps({"device": f"d{i}", "state": "online"}).encode() for i in range(FLOOD)]
    return [
        json.dumps({"conversation": conversation, "delivered": 1, "device": f"d{i}"}).encode()
        for i in range(FLOOD)
    ]


@pytest.mark.parametrize("kind", ["ack", "typing", "presence"])
async def test_a_flood_of_any_uplink_is_refused_without_database_work(
    stack: Stack, kind: str
) -> None:
    await restart_bridge(stack, uplink_rate=f"{ALLOWED}/minute", max_devices="1000")
    await stack.add_users("mallory", "alice", "bob")
    alice = await stack.client("alice")
    bob = await stack.client("bob")
    # A conversation of mallory's, for the acks to name.
    mallory_sdk = await stack.client("mallory", device="sdk")
    sent = await mallory_sdk.send("hi", to="bob", timeout=20)
    await mallory_sdk.close()
    assert (await bob.next_message(timeout=20)).body == "hi"
    await restart_bridge(stack)  # count this test's turns from here
    link, errors = await listener(stack, "mallory")

    for payload in flood_payloads(kind, sent.conversation):
        link.publish(topics.up("mallory", kind), payload, qos=1)  # type: ignore[arg-type]
    # alice and bob chat through the flood.
    for i in range(3):
        await alice.send(f"still here {i}", to="bob", timeout=20)
        assert (await bob.next_message(timeout=20)).body == f"still here {i}"

    refused = 0
    async with asyncio.timeout(30):
        while refused < FLOOD - ALLOWED:
            error = await errors.get()
            if error["code"] == "rate_limited":
                refused += 1
    assert refused == FLOOD - ALLOWED
    # What got through: at most ALLOWED new device names, at most a few lookups.
    assert len(device_names(stack, "mallory")) <= 1 + ALLOWED  # +1: the SDK's own device
    # alice's three messages, bob's and alice's acks and presence, mallory's allowed
    # five: a few dozen turns at most, never one per flooded uplink.
    assert database_turns(stack) < FLOOD // 4


async def test_new_device_names_beyond_the_cap_are_refused(stack: Stack) -> None:
    await restart_bridge(stack, max_devices="3")
    await stack.add_users("mallory", "bob")
    sdk = await stack.client("mallory", device="phone")  # device 1 (presence, acks)
    sent = await sdk.send("hi", to="bob", timeout=20)
    link, errors = await listener(stack, "mallory")
    for device in ("tablet", "laptop", "watch", "tv"):  # 2, 3, then two over the cap
        payload = json.dumps({"device": device, "state": "online"}).encode()
        link.publish(topics.up("mallory", "presence"), payload, qos=1)
    async with asyncio.timeout(20):
        codes = [(await errors.get())["code"] for _ in range(2)]
    ack = {"conversation": sent.conversation, "delivered": 1}
    link.publish(topics.up("mallory", "ack"), json.dumps({**ack, "device": "car"}).encode(), qos=1)
    async with asyncio.timeout(20):
        codes.append((await errors.get())["code"])
    assert codes == ["too_many_devices"] * 3
    # A known name keeps working: the cursor of "tablet" moves, no error follows.
    link.publish(
        topics.up("mallory", "ack"), json.dumps({**ack, "device": "tablet"}).encode(), qos=1
    )
    sentinel = {"conversation": "nope", "typing": True}
    link.publish(topics.up("mallory", "typing"), json.dumps(sentinel).encode(), qos=1)
    async with asyncio.timeout(20):
        assert (await errors.get())["code"] == "unknown_conversation"
    names = device_names(stack, "mallory")
    assert names == {"phone", "tablet", "laptop"}


def test_a_delivery_trace_is_bounded(store_engine: Any) -> None:
    """Accounts from before the cap may have thousands of device names."""
    from protocol import UpMessage
    from store.messages import DirectConversations, persist_batch

    [outcome] = persist_batch(
        store_engine, [("alice", UpMessage(id="m1", to="bob", body="hi"))], DirectConversations()
    )
    assert outcome.stored is not None
    with Session(store_engine) as session:
        for i in range(history.MAX_TRACE_DEVICES + 50):
            session.add(
                Cursor(
                    conversation_id=outcome.stored.conversation,
                    username="bob",
                    device=f"d{i:04}",
                    delivered_seq=1,
                )
            )
        session.commit()
        trace = history.delivery_trace(session, "alice", "m1")
    assert trace is not None
    assert len(trace.devices) == history.MAX_TRACE_DEVICES
    assert trace.more_devices
