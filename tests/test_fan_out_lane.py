"""The bridge's fan-out lane: a group message's many publishes let other
conversations' deliveries pass them, never their own conversation's.

On both brokers, with the bridge's real MQTT link and a stock client watching.
"""

from __future__ import annotations

import asyncio
import secrets

from bridge.service import FAN_OUT_CHUNK, Bridge, _Batch, _Publish
from core.mqtt import Incoming
from protocol import topics

from .support.devices import devices
from .support.stack import Stack, unique_names


async def test_a_big_fan_out_lets_other_conversations_pass_but_not_its_own(
    shared_stack: Stack,
) -> None:
    (watcher,) = await shared_stack.new_users("watcher")
    got: asyncio.Queue[bytes] = asyncio.Queue()

    def received(message: Incoming) -> None:
        got.put_nowait(message.payload)

    link = await shared_stack.raw(watcher, on_message=received)
    await link.subscribe(topics.down_msg(watcher))
    # The bridge's own account, on a session of its own beside the running bridge.
    settings = shared_stack.bridge_settings.model_copy(
        update={"client_id": f"lane-test-{secrets.token_hex(3)}"}
    )
    bridge = Bridge(settings)
    await bridge.link.connect()
    try:
        topic = topics.down_msg(watcher)
        big = _Batch(
            uplinks=[],
            publishes=[
                _Publish(topic, f"group {i}".encode(), conversation="g")
                for i in range(FAN_OUT_CHUNK + 8)
            ],
        )
        after = _Batch(
            uplinks=[],
            publishes=[
                _Publish(topic, b"group receipt", conversation="g"),
                _Publish(topic, b"direct", conversation="d"),
            ],
        )
        bridge._deliver(big)
        bridge._deliver(after)
        order = [
            (await asyncio.wait_for(got.get(), 10)).decode() for _ in range(FAN_OUT_CHUNK + 10)
        ]
        assert order == [
            "direct",
            *(f"group {i}" for i in range(FAN_OUT_CHUNK + 8)),
            "group receipt",
        ]
        assert not bridge._behind  # nothing left counted in the lane
        await asyncio.wait_for(asyncio.gather(*bridge._ack_tasks), 10)
    finally:
        await bridge.link.close()
        bridge.engine.dispose()


async def test_a_group_bigger_than_a_chunk_gets_every_message_once_in_order(
    shared_stack: Stack,
) -> None:
    names = unique_names(*(f"m{i}" for i in range(FAN_OUT_CHUNK + 4)))
    members = await devices(shared_stack, *names)
    sender, direct_peer = members[0], members[1]
    group = (await sender.op("create", name="big", members=list(names[1:])))["conversation"]
    for member in members:
        (event,) = await member.messages(1)
        assert (event["event"], event["seq"]) == ("created", 1)
    # A 1:1 conversation of two members, written while the group fans out.
    hello = f"hello-{secrets.token_hex(3)}"
    await direct_peer.up("msg", id=hello, to=sender.user, body="hello")
    direct = (await direct_peer.next("receipt"))["conversation"]
    assert [m["body"] for m in await sender.messages(1)] == ["hello"]

    n = 4
    sends = [sender.send(group, f"to all {i}") for i in range(n)]
    replies = [direct_peer.send(direct, f"aside {i}") for i in range(n)]
    await asyncio.gather(*sends, *replies)

    for member in members[2:]:
        got = await member.messages(n)
        assert [(m["seq"], m["body"]) for m in got] == [(2 + i, f"to all {i}") for i in range(n)]
        assert member.kinds["msg"].empty()
    mine = await sender.messages(2 * n)
    in_group = [m["body"] for m in mine if m["conversation"] == group]
    aside = [m["body"] for m in mine if m["conversation"] == direct]
    assert in_group == [f"to all {i}" for i in range(n)]
    assert aside == [f"aside {i}" for i in range(n)]
