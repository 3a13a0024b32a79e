"""The two mqchat stacks the end-to-end tests and the benchmarks run on.

* ``embedded``: amqtt (``python -m broker``) + bridge + SQLite, as ``mqchat up`` runs it;
* ``production``: mosquitto with the production config and dynsec + bridge + PostgreSQL.

Every service is the real program, started from its binary on free loopback ports;
the bridge always runs as its own process (``python -m bridge``) so that tests can
kill it the way a crash would. ``tests/conftest.py`` turns these into fixtures.

Our daemons are configured as ``mqchat up`` configures them: a settings object per
daemon (``BridgeSettings``, ``BrokerSettings``, ``ApiSettings``), built with
``core.daemon.build`` and written into its environment by ``core.daemon``, so a
renamed setting fails here instead of being dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr
from pydantic_settings import BaseSettings
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from bridge.config import BridgeSettings
from broker.config import BrokerSettings
from core import daemon
from core.accounts import EmbeddedProvisioner, Provisioner, register
from core.daemon import BRIDGE_READY_LOG as READY_LOG
from core.dynsec import DynsecProvisioner
from core.mqtt import Incoming, LinkConfig, MqttLink, Will
from history_api.config import ApiSettings
from mqchat import ChatClient, HistoryClient
from protocol import UpMessage
from store import accounts, make_engine, migrate
from store.messages import DirectConversations, GroupMembers, persist_batch
from store.tables import Message

from .netns import Switch
from .rabbitmq import RabbitCluster, start_rabbitmq_cluster
from .services import (
    LOOPBACK,
    Daemon,
    MosquittoServer,
    PostgresServer,
    free_port,
    start_mosquitto,
    with_settings,
)

PASSWORD_SUFFIX = "-secret-pw"
#: What the test stacks' mosquitto changes in the production config.
TEST_MOSQUITTO_SETTINGS = {
    "plugin_opt_publish_rate": "0",
    # Churn tests connect one user hundreds of times a minute on purpose (as on the
    # embedded stack below); tests/test_signin_bound.py turns it on where it is the subject.
    "plugin_opt_sign_ins_per_minute": "0",
}
BRIDGE_READY = READY_LOG

_S = TypeVar("_S", bound=BaseSettings)


def password_of(user: str) -> str:
    return user + PASSWORD_SUFFIX


def migrated_sqlite(path: Path, *users: str) -> str:
    """A migrated SQLite database at ``path`` with ``users`` (passwords ``password_of``)."""
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as session:
        for user in users:
            accounts.create(session, user, password_of(user))
        session.commit()
    engine.dispose()
    return url


@dataclass
class Stack:
    """A running mqchat: broker, bridge, database; helpers to add users and clients."""

    name: str
    host: str
    port: int
    database_url: str
    engine: Engine
    bridge: Daemon
    base_dir: Path
    mosquitto: MosquittoServer | None = None
    embedded_broker: Daemon | None = None
    rabbitmq: RabbitCluster | None = None
    #: More bridge instances than ``bridge`` (the RabbitMQ stack's partitions).
    more_bridges: list[Daemon] = field(default_factory=list)
    api: Daemon | None = None
    api_url: str | None = None
    #: The key the broker checks MQTT credentials with; the API signs with it too.
    credential_secret: str | None = None
    _clients: list[ChatClient] = field(default_factory=list)
    _links: list[MqttLink] = field(default_factory=list)

    @property
    def bridge_metrics_url(self) -> str:
        """The bridge's ``/metrics``, ``/livez`` and ``/readyz`` are under this."""
        addr = self.bridge_settings.metrics_addr
        assert addr is not None
        return f"http://{addr}"

    @property
    def broker_metrics_url(self) -> str:
        """The embedded broker's ``/metrics``, ``/livez`` and ``/readyz`` (mosquitto has
        its ``$SYS`` topics instead: docs/operations.md)."""
        assert self.embedded_broker is not None, "the embedded stack's"
        settings = self.embedded_broker.settings
        assert isinstance(settings, BrokerSettings)
        assert settings.metrics_addr is not None
        return f"http://{settings.metrics_addr}"

    @property
    def bridge_settings(self) -> BridgeSettings:
        """What the bridge runs with (after any ``reconfigure``)."""
        settings = self.bridge.settings
        assert isinstance(settings, BridgeSettings)
        return settings

    def provisioner(self) -> contextlib.AbstractAsyncContextManager[Provisioner]:
        if self.mosquitto is None:
            return contextlib.nullcontext(EmbeddedProvisioner())
        return DynsecProvisioner(
            self.mosquitto.link_config(self.mosquitto.admin, f"admin-{secrets.token_hex(4)}")
        )

    async def add_users(self, *names: str) -> None:
        async with self.provisioner() as provisioner:
            for name in names:
                await register(self.engine, provisioner, name, password_of(name))

    async def new_users(self, *names: str) -> tuple[str, ...]:
        """Accounts of this test's own on a shared stack: ``names`` made unique
        (:func:`unique_names`), added, and returned in the order given."""
        users = unique_names(*names)
        await self.add_users(*users)
        return users

    async def client(
        self,
        user: str,
        device: str = "phone",
        *,
        port: int | None = None,
        host: str | None = None,
        **options: Any,
    ) -> ChatClient:
        """``user``'s device, connected, closed with the test's other clients.

        Args:
            port: another port on the stack's host than the broker's own: a
                ``TcpProxy`` in front of it, for a test that breaks the network.
            host: another host than the stack's (a cluster's node in a namespace).
            options: more of :class:`mqchat.ChatClient`'s (``resend_after`` is 2 s here).
        """
        options.setdefault("resend_after", 2.0)
        client = ChatClient(
            host=self.host if host is None else host,
            port=self.port if port is None else port,
            username=user,
            password=password_of(user),
            device=device,
            **options,
        )
        await client.connect()
        self._clients.append(client)
        return client

    async def two_who_chatted(self, body: str = "before") -> tuple[ChatClient, ChatClient]:
        """alice and bob, connected, with one message from alice delivered to bob: their
        conversation exists and both ends work, the ground a test then breaks something
        on (the bridge, the broker, the database). Fixed names: for a stack of one test's
        own, not :func:`shared_stack`'s."""
        await self.add_users("alice", "bob")
        alice = await self.client("alice")
        bob = await self.client("bob")
        await alice.send(body, to="bob", timeout=20)
        assert (await bob.next_message(timeout=20)).body == body
        return alice, bob

    def chatted(self, user: str, *others: str) -> None:
        """Make ``user`` and each of ``others`` contacts: a 1:1 conversation each,
        stored directly (no broker round trip), so presence flows between them."""
        for other in others:
            up = UpMessage(id=f"hello-{user}-{other}", to=other, body="hello")
            outcome = persist_batch(
                self.engine, [(user, up)], directs=DirectConversations(), groups=GroupMembers()
            )
            assert outcome[0].error is None, outcome[0].error

    async def raw(
        self,
        user: str,
        password: str | None = None,
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        will: Will | None = None,
        on_message: Callable[[Incoming], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
        connect: bool = True,
        port: int | None = None,
        host: str | None = None,
    ) -> MqttLink:
        """A stock MQTT client (no SDK): what mosquitto_pub or an IoT device would be.
        Closed with the test's other clients; ``connect=False`` for a test that
        connects it itself (to see a refusal, or to reconnect a persistent session);
        ``host``, ``port``: elsewhere than the stack's broker (a cluster's other node)."""
        link = MqttLink(
            LinkConfig(
                host=self.host if host is None else host,
                port=self.port if port is None else port,
                username=user,
                password=password if password is not None else password_of(user),
                client_id=client_id or f"{user}:raw-{secrets.token_hex(3)}",
                clean_session=clean_session,
                will=will,
            ),
            on_message=on_message,
            on_connect=on_connect,
        )
        if connect:
            await link.connect()
        self._links.append(link)
        return link

    async def start_api(self, **changes: Any) -> str:
        """Start the history API on a free port; returns its base URL. ``changes``: its
        settings by field name (``mqtt_credential_ttl=1``)."""
        mosquitto: dict[str, Any] = {}
        if self.mosquitto is not None:
            # As mqchat up --mosquitto runs it: accounts (and revocations) told to mosquitto.
            mosquitto = {
                "mosquitto_host": self.mosquitto.host,
                "mosquitto_port": self.mosquitto.port,
                "mosquitto_admin_username": self.mosquitto.admin.username,
                "mosquitto_admin_password": self.mosquitto.admin.password,
            }
        self.api = api_daemon(
            self.base_dir,
            self.database_url,
            **({"mqtt_credential_secret": self.credential_secret} | mosquitto | changes),
        )
        await asyncio.to_thread(self.api.start_ready)
        self.api_url = api_url(self.api)
        return self.api_url

    def history(self, user: str) -> HistoryClient:
        assert self.api_url is not None, "start_api() first"
        return HistoryClient(self.api_url, user, password_of(user))

    def limit_broker_queue(self, messages: int) -> None:
        """Restart mosquitto with a smaller per-client queue (the embedded broker's stays
        at its default, ``MQCHAT_BROKER_MAX_QUEUED_MESSAGES``)."""
        if self.mosquitto is None:
            return
        conf = self.mosquitto.conf_path
        conf.write_text(with_settings(conf.read_text(), {"max_queued_messages": str(messages)}))
        self.mosquitto.restart()

    def broker_log(self) -> str:
        """All the broker wrote to its log so far."""
        if self.mosquitto is not None:
            return self.mosquitto.log_path.read_text(errors="replace")
        assert self.embedded_broker is not None
        return self.embedded_broker.log_text()

    def set_publish_quota(self, rate: float, burst: int) -> None:
        """Restart the broker with another per-user publish quota (broker/quota.py,
        and the plugin's ``plugin_opt_publish_*`` lines on mosquitto)."""
        self._reconfigure_broker(
            {"plugin_opt_publish_rate": f"{rate:g}", "plugin_opt_publish_burst": str(burst)},
            publish_rate=rate,
            publish_burst=burst,
        )

    def set_sign_ins_per_user(self, per_minute: int) -> None:
        """Restart the broker with another per-user sign-in throttle (the embedded
        broker's ``sign_ins_per_user``, the plugin's ``plugin_opt_sign_ins_per_minute``)."""
        self._reconfigure_broker(
            {"plugin_opt_sign_ins_per_minute": str(per_minute)},
            sign_ins_per_user=f"{per_minute}/minute",
        )

    def _reconfigure_broker(self, mosquitto: dict[str, str], **embedded: Any) -> None:
        """Restart the broker with ``mosquitto``'s config lines or the ``embedded``
        broker's settings changed, and the bridge after it."""
        if self.mosquitto is not None:
            conf = self.mosquitto.conf_path
            conf.write_text(with_settings(conf.read_text(), mosquitto))
        else:
            assert self.embedded_broker is not None
            self.embedded_broker.reconfigure(**embedded)
        self.bridge.stop()
        self.restart_broker()
        # Subscribed again before this returns: amqtt forgets every session.
        self.start_bridge()

    def start_bridge(self) -> None:
        self.bridge.start_ready()

    def restart_broker(self) -> None:
        if self.mosquitto is not None:
            self.mosquitto.restart()
        else:
            assert self.embedded_broker is not None
            self.embedded_broker.restart()

    def view(self) -> Stack:
        """This stack for one test: the same daemons and database, the test's own
        clients (closed by :meth:`close_clients`, the daemons left running)."""
        return replace(self, _clients=[], _links=[])

    async def close_clients(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)
        for link in self._links:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.close(), 5)

    async def close(self) -> None:
        await self.close_clients()
        for child in (self.bridge, *self.more_bridges, self.api, self.embedded_broker):
            if child is not None:
                child.stop()
        if self.mosquitto is not None:
            self.mosquitto.close()
        if self.rabbitmq is not None:
            self.rabbitmq.close()
        self.engine.dispose()


#: Bridge instances on the RabbitMQ stack.
RABBITMQ_BRIDGES = 2

#: The migrated database every PostgreSQL test database is copied from (the
#: ``postgres`` fixture creates it once per session).
TEMPLATE_DATABASE = "mqchat_template"


def template_copy(postgres: PostgresServer, prefix: str = "mqchat") -> str:
    """A new database copied from :data:`TEMPLATE_DATABASE`; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    postgres.create_database(name, template=TEMPLATE_DATABASE)
    return postgres.url(name)


def bridge_settings(
    database_url: str, host: str, port: int, password: str, **changes: Any
) -> BridgeSettings:
    """The test bridge's settings; ``changes`` by field name (``keepalive=15``)."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "mqtt_host": host,
        "mqtt_port": port,
        "password": password,
        "keepalive": 5,
        # Throughput tests send hundreds a second; the rate-limit tests set their own.
        "message_rate": "10000/second",
        "uplink_rate": "10000/second",
        # On in every test, as `mqchat up` runs it: tests/test_metrics.py reads it.
        "metrics_addr": f"{LOOPBACK}:{free_port()}",
    }
    return daemon.build(BridgeSettings, **(values | changes))


def bridge_daemon(base: Path, settings: BridgeSettings, name: str = "bridge") -> Daemon:
    """``python -m bridge`` with ``settings``, ready once it consumes uplinks."""
    return Daemon(name, "bridge", {}, base, settings=settings, ready_line=BRIDGE_READY)


def handled_uplinks(bridge: Daemon) -> int:
    """What a stopped bridge says it handled since its latest start."""
    found = re.search(r"stopped after handling (\d+) uplinks", bridge.latest_log())
    assert found is not None, bridge.log_tail()
    return int(found[1])


def api_daemon(base: Path, database_url: str, host: str = LOOPBACK, **changes: Any) -> Daemon:
    """``python -m history_api`` on a free loopback port (or ``host``), ready once it
    accepts; ``changes``: its settings by field name."""
    port = free_port()
    values = {"database_url": database_url, "host": host, "port": port} | changes
    settings = daemon.build(ApiSettings, **values)
    return Daemon("api", "history_api", {}, base, settings=settings, ports=[(host, port)])


def api_url(api: Daemon) -> str:
    host, port = api.ports[0]
    return f"http://{host}:{port}"


def from_variables(settings: type[_S], env: Mapping[str, str]) -> dict[str, str]:
    """Settings given as variables (``{"MQCHAT_BROKER_PORT": "1884"}``, as a test's
    fixture may) as the fields they set (``{"port": "1884"}``), for ``core.daemon.build``.

    Raises:
        TypeError: a variable sets no field of ``settings`` (misspelt, or renamed).
    """
    fields = {daemon.variable(settings, name): name for name in settings.model_fields}
    unknown = sorted(set(env) - set(fields))
    if unknown:
        raise TypeError(f"{settings.__name__} has no variable {', '.join(unknown)}")
    return {fields[key]: value for key, value in env.items()}


def start_embedded_broker(
    base: Path,
    database_url: str,
    *,
    timeout: float = 30,
    module: str = "broker",
    **changes: Any,
) -> tuple[Daemon, int, str]:
    """Start ``python -m broker`` (amqtt) over ``database_url`` on a free loopback port
    and wait until it accepts connections. Blocking. ``module``: another entry point
    of the same broker (the load benchmark's ``bench._amqtt_raw``); ``changes``: its
    settings by field name.

    Returns:
        The daemon, its MQTT port and the bridge's (random) password.
    """
    port = free_port()
    bridge_password = secrets.token_urlsafe(16)
    values: dict[str, Any] = {
        "database_url": database_url,
        "port": port,
        "ws_port": free_port(),
        "bridge_password": bridge_password,
        "mqtt_credential_secret": secrets.token_urlsafe(32),
        # Test and benchmark clients all come from loopback, many at once; the
        # per-source connection limit (tests/test_broker_throttle.py sets its own)
        # is not what they are about.
        "connect_rate": "100000/second",
        "metrics_addr": f"{LOOPBACK}:{free_port()}",
    }
    settings = daemon.build(BrokerSettings, **(values | changes))
    broker = Daemon("broker", module, {}, base, settings=settings, ports=[(LOOPBACK, port)])
    broker.start_ready(timeout)
    return broker, port, bridge_password


def new_stack(
    name: str, base: Path, database_url: str, host: str, port: int, password: str, **parts: Any
) -> Stack:
    """A stack around a running broker at ``host:port``; its bridge not started yet."""
    bridge = bridge_daemon(base, bridge_settings(database_url, host, port, password))
    engine = make_engine(database_url)
    return Stack(name, host, port, database_url, engine, bridge, base, **parts)


async def start_embedded_stack(base: Path, broker_env: dict[str, str] | None = None) -> Stack:
    """``broker_env``: more of the broker's settings, as variables (a fixture's)."""
    db_url = f"sqlite:///{base / 'mqchat.db'}"
    engine = make_engine(db_url)
    migrate(engine)
    engine.dispose()
    settings: dict[str, Any] = {
        "account_poll": 0.2,
        # Churn tests connect one user hundreds of times a minute on purpose;
        # tests/test_signin_bound.py sets the default back where it is the subject.
        "sign_ins_per_user": "100000/minute",
        "sign_ins_per_second": 100000,
        # Like the bridge's rates: tests/test_publish_quota.py sets its own.
        "publish_rate": 0,
    }
    settings |= from_variables(BrokerSettings, broker_env or {})
    broker, port, bridge_password = await asyncio.to_thread(
        partial(start_embedded_broker, base, db_url, **settings)
    )
    secret = broker.settings.mqtt_credential_secret
    assert isinstance(secret, SecretStr)
    stack = new_stack(
        "embedded",
        base,
        db_url,
        LOOPBACK,
        port,
        bridge_password,
        embedded_broker=broker,
        credential_secret=secret.get_secret_value(),
    )
    await asyncio.to_thread(stack.start_bridge)
    return stack


async def start_production_stack(
    base: Path, postgres: PostgresServer, *, tls_cert: tuple[bytes, bytes] | None = None
) -> Stack:
    db_url = template_copy(postgres)
    mosq = await asyncio.to_thread(
        # The publish quota off, as on the embedded stack (test_publish_quota sets one).
        partial(start_mosquitto, base, tls_cert=tls_cert, settings=TEST_MOSQUITTO_SETTINGS)
    )
    stack = new_stack(
        "production",
        base,
        db_url,
        mosq.host,
        mosq.port,
        mosq.bridge.password,
        mosquitto=mosq,
        credential_secret=mosq.credential_secret,
    )
    await asyncio.to_thread(stack.start_bridge)
    return stack


async def start_rabbitmq_stack(
    base: Path, postgres: PostgresServer, nodes: int = 3, switch: Switch | None = None
) -> Stack:
    """A 3-node RabbitMQ cluster whose accounts are the history API's
    (``history_api/broker_auth.py``), with PostgreSQL and a bridge on the first node.

    The API starts first: the nodes' config names its URL. With a ``switch`` the nodes
    run in its hosts' namespaces (``start_rabbitmq_cluster``) and the API listens on the
    switch's gateway address, where they reach it.
    """
    db_url = template_copy(postgres)
    secret = secrets.token_urlsafe(24)
    # Every MQTT connect is a request here (RabbitMQ's cache is keyed by the client id
    # too); the isolation tests open hundreds in seconds, which the default sign-in
    # rate (a backstop against storms, docs/operations.md) is not about.
    api = api_daemon(
        base,
        db_url,
        host=LOOPBACK if switch is None else switch.gateway,
        broker_auth_secret=secret,
        sign_ins_per_second=100000,
        sign_in_burst=100000,
    )
    await asyncio.to_thread(api.start_ready)
    try:
        url = api_url(api)
        cluster = await asyncio.to_thread(
            partial(
                start_rabbitmq_cluster,
                base,
                nodes,
                auth_http_url=f"{url}/broker-auth/{secret}",
                switch=switch,
            )
        )
    except BaseException:
        api.stop()
        raise
    first = cluster.nodes[0]
    stack = new_stack(
        "rabbitmq",
        base,
        db_url,
        cluster.host,
        first.mqtt_port,
        cluster.bridge.password,
        rabbitmq=cluster,
        api=api,
        api_url=url,
    )
    # Two bridges, partitions of the uplink queues (bridge/amqp_source.py), each
    # publishing through a node of its own: the first through the first node, the
    # others from the last node back (tests/test_rabbitmq_node_loss.py kills the last),
    # each told the other nodes to move to.
    amqp = ",".join(f"{node.host}:{node.amqp_port}" for node in cluster.nodes)

    def others(index: int) -> str:
        rest = cluster.nodes[index + 1 :] + cluster.nodes[:index]
        return ",".join(f"{node.host}:{node.mqtt_port}" for node in rest)

    stack.bridge.reconfigure(
        amqp_addresses=amqp,
        partitions=RABBITMQ_BRIDGES,
        partition=0,
        mqtt_other_addresses=others(0),
        # The tests kill nodes and cut them off: a silent node is given up after 7.5 s
        # (MQTT keepalive) or 18 s (AMQP heartbeat) instead of 22 and 48.
        keepalive=5,
    )
    for index in range(1, RABBITMQ_BRIDGES):
        node_index = -index % len(cluster.nodes)
        settings = daemon.replace(
            stack.bridge_settings,
            partition=index,
            client_id=f"mqchat-bridge-{index + 1}",
            mqtt_host=cluster.nodes[node_index].host,
            mqtt_port=cluster.nodes[node_index].mqtt_port,
            mqtt_other_addresses=others(node_index),
            metrics_addr=f"{LOOPBACK}:{free_port()}",
        )
        stack.more_bridges.append(bridge_daemon(base, settings, f"bridge-{index + 1}"))
    try:
        for bridge in (stack.bridge, *stack.more_bridges):
            await asyncio.to_thread(bridge.start_ready)
    except BaseException:
        await stack.close()
        raise
    return stack


@contextlib.asynccontextmanager
async def running(starting: Awaitable[Stack]) -> AsyncIterator[Stack]:
    """The stack ``starting`` brings up (``start_embedded_stack(...)``, say), closed
    however the block ends: a fixture that owns a stack cannot leak its daemons."""
    stack = await starting
    try:
        yield stack
    finally:
        await stack.close()


def stored(stack: Stack, *senders: str) -> list[Message]:
    """The message rows of the stack's database in the order they were stored: all of
    them, or those sent by ``senders`` (a shared stack holds other tests' too)."""
    query = select(Message).order_by(col(Message.pk))
    if senders:
        query = query.where(col(Message.sender).in_(senders))
    with Session(stack.engine) as session:
        return list(session.exec(query).all())


def unique_names(*names: str) -> tuple[str, ...]:
    """``names`` made this test's own (``bob`` -> ``bob_3fa9c1``), for a shared stack
    where every test adds its users beside the others'."""
    tag = secrets.token_hex(3)
    return tuple(f"{name}_{tag}" for name in names)


async def start_two_bridges(stack: Stack) -> Daemon:
    """Restart the stack's bridge as partition 0 of 2 and start partition 1 beside it."""
    stack.bridge.stop()
    stack.bridge.reconfigure(partitions=2, partition=0)
    await asyncio.to_thread(stack.start_bridge)
    settings = daemon.replace(
        stack.bridge_settings,
        partition=1,
        client_id="mqchat-bridge-2",
        metrics_addr=f"{LOOPBACK}:{free_port()}",
    )
    second = bridge_daemon(stack.base_dir, settings, "bridge-2")
    await asyncio.to_thread(second.start_ready)
    return second
