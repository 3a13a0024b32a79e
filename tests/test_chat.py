"""The core path, end to end, on both stacks: send, store, deliver, receipt."""

from __future__ import annotations

import asyncio
import json

import pytest

from core.mqtt import Incoming
from protocol import topics

from .support.services import wait_until
from .support.stack import Stack, stored
from .support.tcp_proxy import TcpProxy


async def test_round_trip_with_sent_receipt(shared_stack: Stack) -> None:
    stack = shared_stack
    alice_name, bob_name = await stack.new_users("alice", "bob")
    alice = await stack.client(alice_name)
    bob = await stack.client(bob_name)

    sent = await alice.send("hello bob", to=bob_name, timeout=20)

    assert sent.seq == 1
    got = await bob.next_message(timeout=10)
    assert (got.sender, got.body, got.seq, got.conversation) == (
        alice_name,
        "hello bob",
        1,
        sent.conversation,
    )
    assert got.id == sent.id
    # The sender's own device sees the stored message too (multi-device echo).
    echo = await alice.next_message(timeout=10)
    assert (echo.id, echo.seq) == (sent.id, 1)
    [row] = stored(stack, alice_name, bob_name)
    assert (row.sender, row.client_id, row.body, row.seq) == (alice_name, sent.id, "hello bob", 1)

    reply = await bob.send("hi alice", conversation=sent.conversation, timeout=20)
    assert (reply.conversation, reply.seq) == (sent.conversation, 2)
    got = await alice.next_message(timeout=10)
    assert (got.sender, got.body, got.seq) == (bob_name, "hi alice", 2)


@pytest.mark.xdist_group("cpu_heavy")
async def test_thousand_messages_each_way_arrive_complete_and_in_order(
    shared_stack: Stack,
) -> None:
    stack = shared_stack
    alice_name, bob_name = await stack.new_users("alice", "bob")
    alice = await stack.client(alice_name)
    bob = await stack.client(bob_name)
    n = 1000

    async def send_all(client: object, sender: str, peer: str) -> None:
        assert hasattr(client, "send")
        results = await asyncio.gather(
            *[client.send(f"{sender}-{i}", to=peer, timeout=120) for i in range(n)]
        )
        seqs = [r.seq for r in results]
        assert seqs == sorted(seqs), "a sender's messages must keep their send order"

    async def receive_all(client: object, peer: str) -> list[str]:
        assert hasattr(client, "next_message")
        bodies: list[str] = []
        seqs: list[int] = []
        # Each side sees both directions (its own echo too): 2n messages in seq order.
        for _ in range(2 * n):
            message = await client.next_message(timeout=60)
            seqs.append(message.seq)
            if message.sender == peer:
                bodies.append(message.body)
        assert seqs == list(range(1, 2 * n + 1))
        return bodies

    _, _, from_bob, from_alice = await asyncio.gather(
        send_all(alice, alice_name, bob_name),
        send_all(bob, bob_name, alice_name),
        receive_all(alice, bob_name),
        receive_all(bob, alice_name),
    )
    assert from_alice == [f"{alice_name}-{i}" for i in range(n)]
    assert from_bob == [f"{bob_name}-{i}" for i in range(n)]
    rows = stored(stack, alice_name, bob_name)
    assert len(rows) == 2 * n
    assert sorted(r.seq for r in rows) == list(range(1, 2 * n + 1))


async def test_same_id_twice_is_stored_once_and_shown_once(shared_stack: Stack) -> None:
    stack = shared_stack
    alice_name, bob_name = await stack.new_users("alice", "bob")
    bob = await stack.client(bob_name)
    receipts: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        # bob's device acks delivery, so "delivered" receipts come too: keep "sent".
        if m.topic == topics.down_receipt(alice_name) and json.loads(m.payload)["status"] == "sent":
            receipts.put_nowait(json.loads(m.payload))

    # A stock client that resends the same publish, as after a lost PUBACK.
    raw = await stack.raw(alice_name, on_message=on_message)
    await raw.subscribe(topics.down_all(alice_name), qos=1)
    payload = json.dumps({"id": "m-1", "to": bob_name, "body": "once"}).encode()
    await raw.publish(topics.up_msg(alice_name), payload, qos=1)
    first = await asyncio.wait_for(receipts.get(), 10)
    await raw.publish(topics.up_msg(alice_name), payload, qos=1)
    second = await asyncio.wait_for(receipts.get(), 10)

    assert first["status"] == second["status"] == "sent"
    assert first["seq"] == second["seq"] == 1
    assert first["id"] == second["id"] == "m-1"
    # The SDK resending the same id gets the same place, too.
    alice = await stack.client(alice_name)
    again = await alice.send("once", to=bob_name, id="m-1", timeout=10)
    assert again.seq == 1
    after = await alice.send("after", to=bob_name, timeout=10)
    assert after.seq == 2

    shown = [await bob.next_message(timeout=10), await bob.next_message(timeout=10)]
    assert [(m.body, m.seq) for m in shown] == [("once", 1), ("after", 2)]
    assert [(r.client_id, r.seq) for r in stored(stack, alice_name, bob_name)] == [
        ("m-1", 1),
        (after.id, 2),
    ]


async def test_offline_recipient_gets_its_messages_on_reconnect(shared_stack: Stack) -> None:
    stack = shared_stack
    alice_name, bob_name = await stack.new_users("alice", "bob")
    bob = await stack.client(bob_name, device="phone")
    await bob.close()  # bob's phone goes offline; the broker keeps its session
    alice = await stack.client(alice_name)
    for i in range(20):
        await alice.send(f"while you were away {i}", to=bob_name, timeout=20)

    bob = await stack.client(bob_name, device="phone")
    got = [await bob.next_message(timeout=10) for _ in range(20)]
    assert [m.body for m in got] == [f"while you were away {i}" for i in range(20)]
    assert [m.seq for m in got] == list(range(1, 21))


async def test_the_bridge_waits_out_a_broker_that_closes_before_connack(stack: Stack) -> None:
    """A broker that closes the connection before its CONNACK (booting, overloaded, or
    a proxy in between giving up) has not refused the bridge's account: the bridge
    tries again and comes up. It used to exit 77, "check MQCHAT_BRIDGE_PASSWORD"."""
    await stack.add_users("alice", "bob")
    async with TcpProxy(stack.host, stack.port) as proxy:
        await asyncio.to_thread(stack.bridge.stop)
        stack.bridge.reconfigure(mqtt_port=proxy.port)
        proxy.cut()  # every connection accepted, then closed at once
        stack.bridge.start()
        await asyncio.to_thread(
            wait_until, lambda: proxy.refused >= 3, timeout=30, what="the bridge trying"
        )
        assert stack.bridge.process is not None
        assert stack.bridge.process.poll() is None, stack.bridge.log_tail()
        proxy.heal()
        await asyncio.to_thread(stack.bridge.wait_ready, 60)

        alice, bob = await stack.client("alice"), await stack.client("bob")
        sent = await alice.send("through", to="bob", timeout=30)
        assert (await bob.next_message(timeout=20)).id == sent.id


async def test_bridge_survives_broker_restart(stack: Stack) -> None:
    alice, bob = await stack.two_who_chatted()

    generation = bob.link.generation
    await asyncio.to_thread(stack.restart_broker)

    # Everyone reconnects and resubscribes by themselves. (amqtt keeps sessions in
    # memory only: what is routed to bob before his subscription is back is gone
    # from the live path, so wait for it; mosquitto keeps it anyway.)
    await asyncio.wait_for(bob.link.wait_reconnected(generation), 30)
    sent = await alice.send("after", to="bob", timeout=60)
    assert sent.seq == 2
    assert (await bob.next_message(timeout=20)).body == "after"
    assert stack.bridge.process is not None
    assert stack.bridge.process.poll() is None
