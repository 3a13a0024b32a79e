"""Uplinks from RabbitMQ over AMQP: each bridge takes its partitions, nobody else's.

::

    device ──MQTT up/*──▶ amq.topic ──chat.v1.u.*.up.#──▶ mqchat.uplinks (x-consistent-hash)
        ──▶ mqchat.uplinks.0 … mqchat.uplinks.<queues-1>   (quorum queues, single active consumer)
        ──▶ the one bridge consuming each, acknowledged after commit and publish

On mosquitto and amqtt every bridge instance receives every uplink and drops the
senders that are not its own (``Bridge._mine``): adding bridges adds broker load. On a
RabbitMQ cluster the broker splits the uplinks: the consistent-hash exchange sends one
routing key (``chat.v1.u.<sender>.up.<kind>``) always to the same queue, so all of one
sender's uplinks of a kind stay in one queue, in order. Queue ``q`` belongs to instance
``q % partitions``, which alone consumes it, and every queue has one active consumer
at a time (``x-single-active-consumer``): a second instance started with the same
``partition`` is a hot standby. When the active one dies its unacknowledged uplinks go
back to the head of their queues and the standby (or the instance restarted by its
supervisor) takes over, in order; meanwhile the queue keeps what arrives, replicated.

Why not every instance on every queue, standing by on the others': RabbitMQ 3.10
makes the first consumer to register the active one and never hands a queue back, so
the first bridge to start (or restart) took every queue and the others idled
(measured: 60 uplinks to one bridge, 0 to the other). Consumer priorities for single
active consumers come with later versions.

Nothing is acknowledged before its commit and publish (``Bridge._ack_when_published``);
an ack for a delivery of a connection that is gone is dropped, and the broker delivers
that uplink again, which dedupe turns into the same stored message.

The routing key holds the kind, so one sender's ``msg`` and ``group`` uplinks can be in
two queues: their relative order is the SDK's (it sends a group change and waits for
its receipt before the next), not the broker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, ExchangeType
from aiormq.exceptions import AMQPError

from core.mqtt import Incoming

log = logging.getLogger(__name__)

UPLINK_EXCHANGE = "mqchat.uplinks"
#: ``amq.topic``'s spelling of ``protocol.topics.ALL_UPLINKS``.
UPLINK_BINDING = "chat.v1.u.*.up.#"
MQTT_EXCHANGE = "amq.topic"


def queue_name(index: int) -> str:
    return f"{UPLINK_EXCHANGE}.{index}"


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic an ``amq.topic`` routing key came from (RabbitMQ turned each
    ``/`` into ``.``; usernames hold no ``.`` on RabbitMQ, see
    ``history_api/broker_auth.py``)."""
    return routing_key.replace(".", "/")


def own_queues(queues: int, partitions: int, partition: int) -> list[int]:
    """The queues instance ``partition`` of ``partitions`` consumes."""
    return list(range(partition, queues, partitions))


class AmqpSource:
    """The uplink queues of a RabbitMQ cluster, consumed by one bridge instance.

    Args:
        addresses: ``(host, port)`` of the nodes' AMQP listeners; tried in turn, at
            start and whenever the connection is lost.
        deliver: called with each uplink, in queue order.
    """

    def __init__(
        self,
        addresses: Sequence[tuple[str, int]],
        username: str,
        password: str,
        *,
        queues: int,
        partitions: int,
        partition: int,
        prefetch: int,
        deliver: Callable[[Incoming], None],
        heartbeat: int = 15,
    ) -> None:
        self.addresses = list(addresses)
        #: AMQP heartbeat seconds: a node that stops answering (partitioned away, its
        #: host gone) is given up after about three of them (aiormq's grace), and its
        #: queues consumed through another. RabbitMQ's default of 60 would leave this
        #: partition's uplinks waiting for three minutes.
        self.heartbeat = heartbeat
        self.username, self.password = username, password
        self.queues, self.partitions, self.partition = queues, partitions, partition
        self.prefetch = prefetch
        self.deliver = deliver
        self._pending: dict[int, AbstractIncomingMessage] = {}
        self._ids = itertools.count(1)
        self._generation = 0
        self._connection: AbstractConnection | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._address_turn = itertools.cycle(range(len(self.addresses)))

    async def start(self, timeout: float) -> None:
        """Connect, declare the topology and consume; returns once consuming."""
        await asyncio.wait_for(self._connect_and_consume(), timeout)
        self._runner = asyncio.create_task(self._stay_connected(), name="amqp-source")

    async def ack(self, incoming: Incoming) -> None:
        message = self._pending.pop(incoming.mid, None)
        if message is None:
            return
        try:
            await message.ack()
        except (AMQPError, RuntimeError, ConnectionError) as exc:
            # Its channel is gone: the broker delivers it again (dedupe holds).
            log.info("uplink ack dropped (%s); it will be delivered again", exc)

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _connect_and_consume(self) -> None:
        last: Exception | None = None
        for _ in range(len(self.addresses)):
            host, port = self.addresses[next(self._address_turn)]
            try:
                connection = await aio_pika.connect(
                    host=host,
                    port=port,
                    login=self.username,
                    password=self.password,
                    timeout=10,
                    heartbeat=self.heartbeat,
                )
                break
            except (TimeoutError, AMQPError, OSError) as exc:
                last = exc
                log.warning("AMQP node %s:%s not reachable: %s", host, port, exc)
        else:
            raise ConnectionError(f"no AMQP node reachable: {last}")
        self._lost = asyncio.Event()
        lost = self._lost
        connection.close_callbacks.add(lambda *_: lost.set())
        self._connection = connection
        self._generation += 1
        self._pending.clear()
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        hashed = await channel.declare_exchange(
            UPLINK_EXCHANGE, ExchangeType.X_CONSISTENT_HASH, durable=True
        )
        await hashed.bind(MQTT_EXCHANGE, routing_key=UPLINK_BINDING)
        mine = own_queues(self.queues, self.partitions, self.partition)
        for index in range(self.queues):
            # Every instance declares and binds them all: the ring is whole whatever
            # starts first, and no uplink is routed to nowhere.
            queue = await channel.declare_queue(
                queue_name(index),
                durable=True,
                arguments={"x-queue-type": "quorum", "x-single-active-consumer": True},
            )
            await queue.bind(hashed, routing_key="1")  # weight: an equal share each
            if index in mine:
                await queue.consume(self._on_message)
        log.info("consuming uplink queues %s of %d on %s:%s", mine, self.queues, host, port)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        mid = next(self._ids)
        self._pending[mid] = message
        self.deliver(
            Incoming(
                topic=mqtt_topic(message.routing_key or ""),
                payload=message.body,
                qos=1,
                retain=False,
                mid=mid,
                generation=self._generation,
            )
        )

    async def _stay_connected(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("AMQP connection lost; uplinks in hand will be delivered again")
            while True:
                try:
                    await self._connect_and_consume()
                    break
                except (TimeoutError, ConnectionError, AMQPError, OSError) as exc:
                    log.warning("AMQP reconnect failed: %s", exc)
                    await asyncio.sleep(1)
