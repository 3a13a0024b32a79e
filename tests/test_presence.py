"""Presence: retained, per user, online while any device is; on both stacks."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from sqlmodel import Session, select

from protocol import Presence, topics
from store.tables import Device

from .support.clients import Watcher
from .support.stack import Stack
from .support.stack import stored as stored_messages


async def test_online_while_any_device_is(stack: Stack) -> None:
    await stack.add_users("alice", "carol")
    watcher = Watcher()
    await watcher.start(stack)

    phone = await stack.client("alice", "phone")
    online = await watcher.state_of("alice", "online")
    datetime.fromisoformat(online["at"])
    laptop = await stack.client("alice", "laptop")

    await phone.close()  # a clean close says offline for the phone only
    sent = await laptop.send("still here", to="carol", timeout=20)
    [stored] = [m for m in stored_messages(stack) if m.client_id == sent.id]
    await laptop.close()
    offline = await watcher.state_of("alice", "offline")
    # The one "offline" came after the laptop's message, not when the phone left.
    assert datetime.fromisoformat(offline["at"]) > stored.sent_at
    alice_states = [p["state"] for who, p in _drain(watcher) if who == "alice"]
    assert alice_states == ["online", "offline"]
    # Nothing said "offline" between the phone leaving and the laptop leaving.
    with Session(stack.engine) as session:
        devices = session.exec(select(Device).where(Device.username == "alice")).all()
        assert {(d.device, d.online) for d in devices} == {("phone", False), ("laptop", False)}


async def test_killed_connection_goes_offline_by_last_will(stack: Stack) -> None:
    await stack.add_users("alice", "carol")
    watcher = Watcher()
    await watcher.start(stack)
    phone = await stack.client("alice", "phone", keepalive=2)
    await watcher.state_of("alice", "online")

    phone.link.abort()  # no DISCONNECT: the broker fires the will after 1.5 keepalives
    await watcher.state_of("alice", "offline", timeout=15)


async def test_presence_is_retained_for_late_subscribers(stack: Stack) -> None:
    await stack.add_users("alice", "carol")
    await stack.client("alice", "phone")
    first = Watcher()
    await first.start(stack, "carol")
    await first.state_of("alice", "online")

    late = Watcher()
    await late.start(stack, "carol")  # subscribes after the fact: the retained state
    await late.state_of("alice", "online", timeout=10)


async def test_users_cannot_publish_presence_themselves(stack: Stack) -> None:
    await stack.add_users("alice", "bob", "carol")
    await stack.client("bob", "phone")
    watcher = Watcher()
    await watcher.start(stack)
    await watcher.state_of("bob", "online")

    alice = await stack.raw("alice")
    forged = json.dumps({"state": "offline", "at": "2020-01-01T00:00:00Z"}).encode()
    await alice.publish(topics.presence("bob"), forged, qos=1, retain=True)
    await alice.publish(topics.presence("alice"), forged, qos=1, retain=True)
    # The bridge's own word after those: bob's laptop joins, bob is still online.
    await stack.client("alice", "phone")
    await watcher.state_of("alice", "online")
    assert all(payload["at"] != "2020-01-01T00:00:00Z" for _, payload in _drain(watcher))


def _drain(watcher: Watcher) -> list[tuple[str, dict[str, str]]]:
    items = []
    while not watcher.seen.empty():
        items.append(watcher.seen.get_nowait())
    return items


async def test_presence_after_bridge_restart(stack: Stack) -> None:
    """Presence words that arrive while the bridge is down are applied when it is back."""
    await stack.add_users("alice", "carol")
    watcher = Watcher()
    await watcher.start(stack)
    phone = await stack.client("alice", "phone")
    await watcher.state_of("alice", "online")

    stack.bridge.kill()
    await phone.close()  # "offline" waits in the bridge's session on the broker
    await asyncio.to_thread(stack.start_bridge)
    await watcher.state_of("alice", "offline")


async def test_presence_after_broker_restart(stack: Stack) -> None:
    """A device that vanished while the broker was down (no will ever fires) times out;
    one that came back is online again, even on a broker that lost its retained state."""
    stack.bridge.stop()
    stack.bridge.env["MQCHAT_BRIDGE_PRESENCE_TTL"] = "3"
    await asyncio.to_thread(stack.start_bridge)
    await stack.add_users("alice", "bob", "carol")
    await stack.client("alice", "phone", presence_interval=1)
    bob = await stack.client("bob", "phone", presence_interval=1)
    watcher = Watcher()
    await watcher.start(stack)
    await watcher.state_of("alice", "online")
    await watcher.state_of("bob", "online")

    if stack.mosquitto is not None:
        await asyncio.to_thread(stack.mosquitto.kill)
    else:
        assert stack.embedded_broker is not None
        stack.embedded_broker.kill()
    bob.link.abort()  # bob's phone dies while the broker is down: no will, ever
    if stack.mosquitto is not None:
        await asyncio.to_thread(stack.mosquitto.start)
    else:
        await asyncio.to_thread(stack.restart_broker)

    await watcher.state_of("bob", "offline", timeout=30)
    await watcher.state_of("alice", "online", timeout=30)


async def test_the_history_api_says_what_mqtt_says(stack: Stack) -> None:
    """One vocabulary: HTTP's ``state`` and ``at`` are MQTT's, through the SDK's model."""
    await stack.add_users("alice", "carol")
    await stack.start_api()
    watcher = Watcher()
    await watcher.start(stack)
    history = stack.history("carol")
    try:
        assert await history.presence("alice") is None  # never seen

        phone = await stack.client("alice", "phone")
        online = Presence.model_validate(await watcher.state_of("alice", "online"))
        # No re-announcement yet, so even online's ``at`` is the same instant.
        assert await history.presence("alice") == online

        await phone.close()
        offline = Presence.model_validate(await watcher.state_of("alice", "offline"))
        assert await history.presence("alice") == offline
    finally:
        await history.close()
