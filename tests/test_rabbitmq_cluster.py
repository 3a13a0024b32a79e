"""mqchat on a 3-node RabbitMQ cluster (``tests/support/rabbitmq.py``, fixture
``shared_rabbitmq``): the cluster forms with the settings ``docs/operations.md`` gives
(quorum-queue sessions) and relays across nodes; devices on different nodes chat
through two bridges; and the broker splits the uplinks between the bridges
(``bridge/amqp_source.py``), counted.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets

import pytest
from pydantic import ValidationError

import protocol
from bridge.config import BridgeSettings
from core import daemon
from core.mqtt import Incoming, LinkConfig, MqttLink
from protocol import topics

from .support.clients import Recorder
from .support.rabbitmq import RabbitCluster, RabbitNode
from .support.stack import Stack, handled_uplinks, stored

#: One worker boots the session's cluster (20-60 s, three Erlang VMs) and runs them all.
pytestmark = pytest.mark.xdist_group("rabbitmq")


def test_three_nodes_form_one_cluster(rabbitmq_cluster: RabbitCluster) -> None:
    names = sorted(node.name for node in rabbitmq_cluster.nodes)
    for index in range(len(names)):
        assert rabbitmq_cluster.running_nodes(node=index) == names
    print(f"cluster of {len(names)} started in {rabbitmq_cluster.startup_seconds:.1f} s")


async def test_qos1_crosses_nodes_into_a_quorum_session(rabbitmq_cluster: RabbitCluster) -> None:
    account = rabbitmq_cluster.admin
    assert account is not None  # the tests' own cluster has an operator
    got: asyncio.Queue[Incoming] = asyncio.Queue()
    topic = f"chat/v1/u/probe{secrets.token_hex(3)}/down/msg"
    first, last = rabbitmq_cluster.nodes[0], rabbitmq_cluster.nodes[-1]

    def on(node: RabbitNode, role: str, *, clean_session: bool) -> LinkConfig:
        """The admin account on ``node``'s MQTT port, under a fresh client id."""
        return LinkConfig(
            host=node.host,
            port=node.mqtt_port,
            username=account.username,
            password=account.password,
            client_id=f"{role}-{secrets.token_hex(3)}",
            clean_session=clean_session,
        )

    subscriber = MqttLink(on(last, "sub", clean_session=False), on_message=got.put_nowait)
    publisher = MqttLink(on(first, "pub", clean_session=True))
    await subscriber.connect()
    await publisher.connect()
    try:
        await subscriber.subscribe(topic, qos=1)
        await publisher.publish(topic, b"across", qos=1)
        message = await asyncio.wait_for(got.get(), 20)
        assert (message.topic, message.payload) == (topic, b"across")
        queues = await asyncio.to_thread(rabbitmq_cluster.ctl, "list_queues", "name", "type")
        session_queues = [line for line in queues.splitlines() if "mqtt-subscription-sub-" in line]
        assert session_queues
        assert all("quorum" in line for line in session_queues)
    finally:
        await publisher.close()
        await subscriber.close()


async def test_devices_on_different_nodes_chat(rabbitmq_stack: Stack) -> None:
    """alice on the second node, bob on the third, the bridge on the first; then bob
    offline, and his queued message waiting for him on yet another node (his session
    is a quorum queue, not a node's)."""
    cluster = rabbitmq_stack.rabbitmq
    assert cluster is not None
    alice_name, bob_name = await rabbitmq_stack.new_users("alice", "bob")
    second, third = cluster.nodes[1], cluster.nodes[2]
    alice = await rabbitmq_stack.client(alice_name, host=second.host, port=second.mqtt_port)
    bob = await rabbitmq_stack.client(bob_name, host=third.host, port=third.mqtt_port)
    await alice.send("hello across nodes", to=bob_name, timeout=20)
    assert (await bob.next_message(timeout=20)).body == "hello across nodes"
    await bob.send("hi back", to=alice_name, timeout=20)
    mine = await alice.next_message(timeout=20)  # her own, as her other devices see it
    assert (mine.sender, mine.body) == (alice_name, "hello across nodes")
    assert (await alice.next_message(timeout=20)).body == "hi back"

    await bob.close()
    await alice.send("while you were away", to=bob_name, timeout=20)
    first = cluster.nodes[0]
    bob = await rabbitmq_stack.client(bob_name, host=first.host, port=first.mqtt_port)
    assert (await bob.next_message(timeout=20)).body == "while you were away"


async def test_each_bridge_receives_only_its_partitions(rabbitmq_stack: Stack) -> None:
    """The broker splits the uplinks (bridge/amqp_source.py): over both bridges every
    uplink is handled exactly once, both take a share, and each sender's messages are
    stored in the order sent."""
    cluster = rabbitmq_stack.rabbitmq
    assert cluster is not None
    bridges = [rabbitmq_stack.bridge, *rabbitmq_stack.more_bridges]
    senders = await rabbitmq_stack.new_users(*(f"s{i}" for i in range(12)))
    (receiver,) = await rabbitmq_stack.new_users("r")
    nodes = cluster.mqtt_addresses
    links = [
        await rabbitmq_stack.raw(sender, host=host, port=port)
        for sender, (host, port) in zip(senders, itertools.cycle(nodes), strict=False)
    ]
    per_sender = 5
    inbox = Recorder()  # the receiver's: all delivered means all stored first
    listener = await rabbitmq_stack.raw(receiver, on_message=inbox)
    await listener.subscribe(topics.down(receiver, "msg"), qos=1)

    def restart_all() -> None:
        for bridge in bridges:
            bridge.stop()
        for bridge in bridges:
            bridge.start_ready()

    await asyncio.to_thread(restart_all)  # counting from zero
    try:
        for n in range(per_sender):
            await asyncio.gather(
                *(
                    link.publish(
                        topics.up(sender, "msg"),
                        protocol.encode(protocol.UpMessage(id=f"m{n}", to=receiver, body=str(n))),
                        qos=1,
                    )
                    for sender, link in zip(senders, links, strict=True)
                )
            )
        async with asyncio.timeout(30):
            while len(inbox.messages) < len(senders) * per_sender:
                inbox._changed.clear()
                await inbox._changed.wait()
    finally:
        for bridge in bridges:
            await asyncio.to_thread(bridge.stop)
        counts = [handled_uplinks(bridge) for bridge in bridges]
        for bridge in bridges:
            await asyncio.to_thread(bridge.start_ready)
    print(f"uplinks handled per bridge: {counts}")
    assert sum(counts) == len(senders) * per_sender
    assert all(counts)
    for sender in senders:
        assert [row.body for row in stored(rabbitmq_stack, sender)] == [
            str(n) for n in range(per_sender)
        ]


def test_node_addresses_read_as_nodes() -> None:
    settings = daemon.build(
        BridgeSettings,
        database_url="sqlite:///x.db",
        password="pw-of-the-bridge",
        amqp_addresses=" rabbit-1:5673, rabbit-2 ,",
        mqtt_other_addresses="rabbit-2:1884,rabbit-3",
    )
    assert settings.amqp_nodes == [("rabbit-1", 5673), ("rabbit-2", 5672)]
    assert settings.mqtt_other_nodes == [("rabbit-2", 1884), ("rabbit-3", 1883)]
    # A port that is not a number is refused when the settings are read, not later.
    with pytest.raises(ValidationError, match="rabbit-2:x"):
        daemon.build(
            BridgeSettings,
            database_url="sqlite:///x.db",
            password="pw-of-the-bridge",
            mqtt_other_addresses="rabbit-2:x",
        )
