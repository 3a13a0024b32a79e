"""Retained messages, on both brokers: who may retain, who gets them, and with which flag.

amqtt 0.12.1, on every CONNECT, walked every filter held by anyone and sent the
newcomer the retained messages matching them, whatever it had subscribed to: a fresh
connection got other users' retained data and every user's presence, so connecting
cost grew with the number of users. It also set the retain flag on messages queued
for a persistent session while it was away. Users could retain on their own uplinks.
"""

from __future__ import annotations

import asyncio
import json
import secrets

from core.mqtt import MqttLink

from .support.clients import BRIDGE, Actor, Recorder, connect_actor, probe
from .support.stack import Stack, password_of

OTHERS = 25


async def sentinel_seen(watcher: Actor, sender: Actor, topic: str, label: str) -> bytes:
    """A live message from ``sender`` on ``topic``, once ``watcher`` has it: anything
    stored for ``watcher`` (retained) would have reached it before, so the wait ends."""
    sentinel = probe(label)
    await sender.link.publish(topic, sentinel, qos=1)
    await watcher.seen.wait_for(sentinel)
    return sentinel


async def test_a_newcomer_gets_retained_messages_only_for_its_own_subscriptions(
    stack: Stack,
) -> None:
    users = [f"user{i}" for i in range(OTHERS)]
    await stack.add_users("alice", "bob", "carol", *users)
    bridge = await connect_actor(stack, BRIDGE, "retainer")
    # Retained state a newcomer must not be sent unasked: something on many users'
    # downlinks, and on alice's.
    for user in users:
        state = json.dumps({"state": "online", "at": "2026-01-01T00:00:00+00:00"}).encode()
        await bridge.link.publish(f"chat/v1/u/{user}/down/presence", state, qos=1, retain=True)
    alice_secret = probe("retained for alice only")
    await bridge.link.publish("chat/v1/u/alice/down/msg", alice_secret, qos=1, retain=True)
    # Filters held by others, which amqtt walked for every newcomer.
    alice = await connect_actor(stack, "alice", "holder")
    await alice.link.subscribe("chat/v1/u/alice/down/#", qos=1)
    carol = await connect_actor(stack, "carol", "holder")
    await carol.link.subscribe("chat/v1/u/carol/down/#", qos=1)
    await alice.seen.wait_for(alice_secret)  # retained on alice's own subscription

    # bob connects with no subscription, then subscribes to his own downlink only.
    bob = await connect_actor(stack, "bob", "newcomer")
    await bob.link.subscribe("chat/v1/u/bob/down/#", qos=1)
    sentinel = await sentinel_seen(bob, bridge, "chat/v1/u/bob/down/typing", "sentinel bob")

    assert [m.payload for m in bob.seen.messages] == [sentinel]


async def test_users_may_not_retain(stack: Stack) -> None:
    """A retained publish from a user is dropped whole, as any publish outside the ACL:
    neither stored for later subscribers nor relayed."""
    await stack.add_users("alice")
    alice = await connect_actor(stack, "alice", "retainer")
    retained = {}
    for kind in ("msg", "ack", "typing", "presence"):
        topic = f"chat/v1/u/alice/up/{kind}"
        retained[topic] = probe(f"retained {topic}")
        await alice.link.publish(topic, retained[topic], qos=1, retain=True)

    # Subscribing afterwards shows what is stored; a live sentinel ends the wait.
    observer = await connect_actor(stack, BRIDGE, "observer")
    await observer.link.subscribe("chat/v1/u/alice/up/#", qos=1)
    sentinel = await sentinel_seen(observer, alice, "chat/v1/u/alice/up/typing", "sentinel")

    assert [m.payload for m in observer.seen.messages] == [sentinel]


async def test_queued_messages_arrive_without_the_retain_flag(stack: Stack) -> None:
    await stack.add_users("bob")
    client_id = f"bob:queue-{secrets.token_hex(3)}"

    async def persistent(on_message: Recorder | None = None) -> MqttLink:
        return await stack.raw(
            "bob", client_id=client_id, clean_session=False, on_message=on_message
        )

    away = await persistent()
    await away.subscribe("chat/v1/u/bob/down/#", qos=1)
    await away.close()

    bridge = await connect_actor(stack, BRIDGE, "sender")
    queued = [probe(f"queued {i}") for i in range(3)]
    for payload in queued:
        await bridge.link.publish("chat/v1/u/bob/down/msg", payload, qos=1)
    # Even a message that was published retained arrives queued with retain 0
    # (MQTT-3.3.1-9), as mosquitto sends it.
    presence = probe("presence, retained")
    await bridge.link.publish("chat/v1/u/bob/down/presence", presence, qos=1, retain=True)

    seen = Recorder()
    await persistent(seen)
    for payload in [*queued, presence]:
        await seen.wait_for(payload)
    flagged = [m.payload for m in seen.messages if m.retain]
    assert not flagged


async def _mosquitto_sub(stack: Stack, client_id: str, *options: str) -> list[str]:
    """Run Debian's mosquitto_sub as bob, persistent session, QoS 1 (at most 20 s)."""
    process = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *("-h", stack.host, "-p", str(stack.port), "-V", "mqttv311"),
        *("-u", "bob", "-P", password_of("bob"), "-i", client_id, "-c", "-q", "1"),
        *("-t", "chat/v1/u/bob/down/#", "-W", "20", *options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()


async def test_queued_messages_reach_mosquitto_sub_without_the_retain_flag(stack: Stack) -> None:
    await stack.add_users("bob")
    client_id = f"bob:sub-{secrets.token_hex(3)}"
    await _mosquitto_sub(stack, client_id, "-E")  # subscribe, then leave the session
    bridge = await connect_actor(stack, BRIDGE, "sender")
    queued = [probe(f"queued {i}").decode() for i in range(3)]
    for payload in queued:
        await bridge.link.publish("chat/v1/u/bob/down/msg", payload.encode(), qos=1)
    lines = await _mosquitto_sub(stack, client_id, "-C", "3", "-F", "%r %t %p")
    assert lines == [f"0 chat/v1/u/bob/down/msg {payload}" for payload in queued]
