"""Per-user isolation on the RabbitMQ cluster: the topic table, checked on every node.

The accounts are the history API's, asked through RabbitMQ's HTTP auth backend
(``history_api/broker_auth.py``); the bridge's service account is RabbitMQ's own, with
topic permissions. As in ``tests/test_acl_matrix.py`` the expectation is the topic
table of DESIGN.md restated here (``may``), every actor x every topic class x publish
and subscribe, and then what arrives must match what was granted.

RabbitMQ 3.10 answers a refusal differently from mosquitto, so each check is a raw
connection of its own, spread round-robin over the nodes:

* publish: a refused QoS 1 PUBLISH closes the connection; an allowed one is PUBACKed.
* subscribe: a refused SUBSCRIBE closes the connection too, without a SUBACK (where
  mosquitto answers 0x80 and keeps it): granted means a SUBACK that is not 0x80.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest

from core.mqtt import ConnectRefused

from .support import acl_table, packets
from .support.acl_table import DOWN_KINDS, may
from .support.clients import BRIDGE, Recorder, password_for, probe
from .support.rabbitmq import RabbitCluster
from .support.stack import Stack, password_of

#: One worker boots the session's cluster (20-60 s, three Erlang VMs) and runs them all.
pytestmark = pytest.mark.xdist_group("rabbitmq")

#: How long one answer may take under a loaded machine; never what decides.
ANSWER = 20.0


def _users() -> tuple[str, ...]:
    """alice, bob and a name bob's is a prefix of, and a 32-character one; unique to
    this run (the cluster's database is shared by the session). No ``.``: RabbitMQ
    does not let one through (``test_a_dotted_username_cannot_sign_up_or_sign_in``)."""
    tag = secrets.token_hex(2)
    return (f"alice{tag}", f"bob{tag}", f"bob{tag}by", f"l{tag}_" + "9" * 26)


def observable_topics(users: tuple[str, ...]) -> list[str]:
    return acl_table.observable_topics(users)


def subscribe_filters(users: tuple[str, ...]) -> list[str]:
    return acl_table.subscribe_filters(users)


class _Conn:
    """One raw MQTT connection: packets in, whole packets out (type, body), or None
    once the broker closed it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def packet(self) -> tuple[int, bytes] | None:
        try:
            async with asyncio.timeout(ANSWER):
                head = await self.reader.read(1)
                if not head:
                    return None
                length, shift = 0, 0
                while True:
                    byte = (await self.reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                return head[0] >> 4, await self.reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            return None

    def close(self) -> None:
        self.writer.close()


class _Checks:
    """Raw connections of the actors, round-robin over the cluster's nodes."""

    def __init__(self, stack: Stack, cluster: RabbitCluster) -> None:
        self.stack = stack
        self.nodes = cluster.mqtt_addresses
        self.turn = 0
        self.gate = asyncio.Semaphore(4)

    @contextlib.asynccontextmanager
    async def connection(self, actor: str) -> AsyncIterator[_Conn]:
        async with self.gate:
            conn = await self._connect(actor)
            try:
                yield conn
            finally:
                conn.close()

    async def _connect(self, actor: str) -> _Conn:
        """Signed in on the next node. CONNACK 3 ("server unavailable", given when the
        cluster's client-id registry is slow to answer on a loaded machine) is
        transient by the protocol: try again, a few times."""
        for _ in range(5):
            self.turn += 1
            host, port = self.nodes[self.turn % len(self.nodes)]
            reader, writer = await asyncio.open_connection(host, port)
            conn = _Conn(reader, writer)
            client_id = f"{actor}:check-{secrets.token_hex(4)}"
            await conn.send(packets.connect(client_id, actor, password_for(self.stack, actor)))
            answer = await conn.packet()
            if answer == (2, b"\x00\x00"):  # CONNACK, accepted
                return conn
            conn.close()
            if answer != (2, b"\x00\x03"):
                raise AssertionError(f"{actor} refused: {answer}")
        raise AssertionError(f"{actor}: server unavailable, five times")

    async def publish(self, actor: str, topic: str) -> bool:
        async with self.connection(actor) as conn:
            await conn.send(packets.publish(topic, probe(topic), qos=1, packet_id=7))
            answer = await conn.packet()
            return answer is not None and answer[0] == 4  # PUBACK; refused: closed

    async def subscribe(self, actor: str, topic_filter: str) -> bool:
        async with self.connection(actor) as conn:
            await conn.send(packets.subscribe([topic_filter], packet_id=1, qos=1))
            while (answer := await conn.packet()) is not None:
                kind, body = answer
                if kind == 9:  # SUBACK (anything else, a message, is not the answer)
                    return body[2] != 0x80
            return False  # refused: closed without a SUBACK


async def test_exactly_the_allowed_combinations_succeed_on_every_node(
    rabbitmq_stack: Stack, rabbitmq_cluster: RabbitCluster
) -> None:
    users = _users()
    await rabbitmq_stack.add_users(*users)
    actors = (*users, BRIDGE)
    checks = _Checks(rabbitmq_stack, rabbitmq_cluster)
    for action, attempt, targets in (
        ("publish", checks.publish, observable_topics(users)),
        ("subscribe", checks.subscribe, subscribe_filters(users)),
    ):
        cases = [(a, t) for a in actors for t in targets]
        outcomes = await asyncio.gather(*(attempt(a, t) for a, t in cases))
        wrong = [
            (a, t, got)
            for (a, t), got in zip(cases, outcomes, strict=True)
            if got != may(a, action, t)
        ]
        assert not wrong, f"{action} outcomes differ from the topic table: {wrong}"


async def test_what_arrives_is_what_was_granted(
    rabbitmq_stack: Stack, rabbitmq_cluster: RabbitCluster
) -> None:
    """Each user subscribed to their own ``down/#`` on a node of their own gets their
    downlinks and nobody else's, bob's prefix-sharing neighbour included."""
    users = _users()
    await rabbitmq_stack.add_users(*users)
    seen = {user: Recorder() for user in users}
    for index, user in enumerate(users):
        node = rabbitmq_cluster.nodes[index % len(rabbitmq_cluster.nodes)]
        link = await rabbitmq_stack.raw(
            user, on_message=seen[user], host=node.host, port=node.mqtt_port
        )
        await link.subscribe(f"chat/v1/u/{user}/down/#", qos=1)
    publisher = await rabbitmq_stack.raw(
        BRIDGE, password_for(rabbitmq_stack, BRIDGE), client_id=f"{BRIDGE}:traffic"
    )
    sent = {}
    for user in users:
        for kind in DOWN_KINDS:
            sent[(user, kind)] = probe(f"{user} {kind}")
            await publisher.publish(f"chat/v1/u/{user}/down/{kind}", sent[(user, kind)], qos=1)
    for user in users:
        last = probe(f"sentinel {user}")
        await publisher.publish(f"chat/v1/u/{user}/down/typing", last, qos=1)
        await seen[user].wait_for(last)
        mine = {payload for (owner, _), payload in sent.items() if owner == user}
        others = {payload for (owner, _), payload in sent.items() if owner != user}
        assert mine <= seen[user].payloads()
        assert not others & seen[user].payloads()


@pytest.mark.parametrize("name", ["d.o", "bob.down"])
async def test_a_dotted_username_cannot_sign_up_or_sign_in(
    rabbitmq_stack: Stack, name: str
) -> None:
    """On RabbitMQ 3.10 a ``.`` splits a topic level: ``bob.down``'s downlinks would
    reach ``bob``'s ``down/#``. The API refuses such names where it answers the broker,
    and the broker refuses an account with one that exists anyway."""
    assert rabbitmq_stack.api_url is not None
    async with httpx.AsyncClient(base_url=rabbitmq_stack.api_url) as api:
        answer = await api.post("/v1/users", json={"username": name, "password": password_of(name)})
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_username"
    dotted = name + secrets.token_hex(2)
    await rabbitmq_stack.add_users(dotted)  # made behind the API's back
    with pytest.raises(ConnectRefused):
        await rabbitmq_stack.raw(dotted)
