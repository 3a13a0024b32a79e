"""The 3-node RabbitMQ cluster the cluster tests run on (``tests/support/rabbitmq.py``).

It is formed, runs the settings ``docs/operations.md`` gives (quorum-queue sessions),
and a QoS 1 publish on one node reaches a subscriber on another.
"""

from __future__ import annotations

import asyncio
import secrets

from core.mqtt import Incoming, LinkConfig, MqttLink

from .support.rabbitmq import RabbitCluster
from .support.stack import Stack


def test_three_nodes_form_one_cluster(rabbitmq_cluster: RabbitCluster) -> None:
    names = sorted(node.name for node in rabbitmq_cluster.nodes)
    for index in range(len(names)):
        assert rabbitmq_cluster.running_nodes(node=index) == names
    print(f"cluster of {len(names)} started in {rabbitmq_cluster.startup_seconds:.1f} s")


async def test_qos1_crosses_nodes_into_a_quorum_session(rabbitmq_cluster: RabbitCluster) -> None:
    account = rabbitmq_cluster.admin
    got: asyncio.Queue[Incoming] = asyncio.Queue()
    topic = f"chat/v1/u/probe{secrets.token_hex(3)}/down/msg"
    first, last = rabbitmq_cluster.nodes[0], rabbitmq_cluster.nodes[-1]
    subscriber = MqttLink(
        LinkConfig(
            host=rabbitmq_cluster.host,
            port=last.mqtt_port,
            username=account.username,
            password=account.password,
            client_id=f"sub-{secrets.token_hex(3)}",
            clean_session=False,
        ),
        on_message=got.put_nowait,
    )
    publisher = MqttLink(
        LinkConfig(
            host=rabbitmq_cluster.host,
            port=first.mqtt_port,
            username=account.username,
            password=account.password,
            client_id=f"pub-{secrets.token_hex(3)}",
            clean_session=True,
        )
    )
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
    second, third = cluster.nodes[1].mqtt_port, cluster.nodes[2].mqtt_port
    alice = await rabbitmq_stack.client(alice_name, port=second)
    bob = await rabbitmq_stack.client(bob_name, port=third)
    await alice.send("hello across nodes", to=bob_name, timeout=20)
    assert (await bob.next_message(timeout=20)).body == "hello across nodes"
    await bob.send("hi back", to=alice_name, timeout=20)
    mine = await alice.next_message(timeout=20)  # her own, as her other devices see it
    assert (mine.sender, mine.body) == (alice_name, "hello across nodes")
    assert (await alice.next_message(timeout=20)).body == "hi back"

    await bob.close()
    await alice.send("while you were away", to=bob_name, timeout=20)
    bob = await rabbitmq_stack.client(bob_name, port=cluster.nodes[0].mqtt_port)
    assert (await bob.next_message(timeout=20)).body == "while you were away"
