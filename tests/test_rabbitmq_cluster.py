"""The 3-node RabbitMQ cluster the cluster tests run on (``tests/support/rabbitmq.py``).

It is formed, runs the settings ``docs/operations.md`` gives (quorum-queue sessions),
and a QoS 1 publish on one node reaches a subscriber on another.
"""

from __future__ import annotations

import asyncio
import secrets

from core.mqtt import Incoming, LinkConfig, MqttLink

from .support.rabbitmq import RabbitCluster


def test_three_nodes_form_one_cluster(rabbitmq_cluster: RabbitCluster) -> None:
    names = sorted(node.name for node in rabbitmq_cluster.nodes)
    for index in range(len(names)):
        assert rabbitmq_cluster.running_nodes(node=index) == names
    print(f"cluster of {len(names)} started in {rabbitmq_cluster.startup_seconds:.1f} s")


async def test_qos1_crosses_nodes_into_a_quorum_session(rabbitmq_cluster: RabbitCluster) -> None:
    account = rabbitmq_cluster.bridge
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
