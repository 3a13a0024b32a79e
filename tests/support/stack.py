"""The two mqchat stacks the end-to-end tests and the benchmarks run on.

* ``embedded``: amqtt (``python -m broker``) + bridge + SQLite, as ``mqchat up`` runs it;
* ``production``: mosquitto with the production config and dynsec + bridge + PostgreSQL.

Every service is the real program, started from its binary on free loopback ports;
the bridge always runs as its own process (``python -m bridge``) so that tests can
kill it the way a crash would. ``tests/conftest.py`` turns these into fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from bridge.config import BridgeSettings
from core import daemon
from core.accounts import EmbeddedProvisioner, Provisioner, register
from core.daemon import BRIDGE_READY_LOG as READY_LOG
from core.dynsec import DynsecProvisioner
from core.mqtt import Incoming, LinkConfig, MqttLink
from mqchat import ChatClient, HistoryClient
from store import accounts, make_engine, migrate
from store.tables import Message

from .services import (
    Daemon,
    MosquittoServer,
    PostgresServer,
    accepts,
    free_port,
    start_mosquitto,
    wait_until,
    with_settings,
)

PASSWORD_SUFFIX = "-secret-pw"
#: What the test stacks' mosquitto changes in the production config.
TEST_MOSQUITTO_SETTINGS = {"plugin_opt_publish_rate": "0"}
BRIDGE_READY = READY_LOG


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
    bridge_env: dict[str, str]
    base_dir: Path
    mosquitto: MosquittoServer | None = None
    embedded_broker: Daemon | None = None
    api: Daemon | None = None
    api_url: str | None = None
    _clients: list[ChatClient] = field(default_factory=list)
    _links: list[MqttLink] = field(default_factory=list)

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

    async def client(self, user: str, device: str = "phone", **options: Any) -> ChatClient:
        options.setdefault("resend_after", 2.0)
        client = ChatClient(
            host=self.host,
            port=self.port,
            username=user,
            password=password_of(user),
            device=device,
            **options,
        )
        await client.connect()
        self._clients.append(client)
        return client

    async def raw(
        self,
        user: str,
        password: str | None = None,
        *,
        client_id: str | None = None,
        on_message: Callable[[Incoming], None] | None = None,
        connect: bool = True,
    ) -> MqttLink:
        """A stock MQTT client (no SDK): what mosquitto_pub or an IoT device would be."""
        link = MqttLink(
            LinkConfig(
                host=self.host,
                port=self.port,
                username=user,
                password=password if password is not None else password_of(user),
                client_id=client_id or f"{user}:raw-{secrets.token_hex(3)}",
                clean_session=True,
            ),
            on_message=on_message,
        )
        if connect:
            await link.connect()
        self._links.append(link)
        return link

    async def start_api(self) -> str:
        """Start the history API on a free port; returns its base URL."""
        port = free_port()
        self.api = Daemon(
            "api",
            "history_api",
            {
                "MQCHAT_API_DATABASE_URL": self.database_url,
                "MQCHAT_API_PORT": str(port),
            },
            self.base_dir,
        )
        self.api.start()
        await asyncio.to_thread(
            wait_until, lambda: accepts("127.0.0.1", port), timeout=30, what="history API"
        )
        self.api_url = f"http://127.0.0.1:{port}"
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

    def set_publish_quota(self, rate: float, burst: int) -> None:
        """Restart the broker with another per-user publish quota (broker/quota.py,
        and the plugin's ``plugin_opt_publish_*`` lines on mosquitto)."""
        if self.mosquitto is not None:
            conf = self.mosquitto.conf_path
            settings = {
                "plugin_opt_publish_rate": f"{rate:g}",
                "plugin_opt_publish_burst": str(burst),
            }
            conf.write_text(with_settings(conf.read_text(), settings))
        else:
            assert self.embedded_broker is not None
            self.embedded_broker.env["MQCHAT_BROKER_PUBLISH_RATE"] = f"{rate:g}"
            self.embedded_broker.env["MQCHAT_BROKER_PUBLISH_BURST"] = str(burst)
        self.bridge.stop()
        self.restart_broker()
        # Subscribed again before this returns: amqtt forgets every session.
        self.start_bridge()

    def start_bridge(self) -> None:
        self.bridge.start()
        self.bridge.wait_for_log(BRIDGE_READY)

    def restart_broker(self) -> None:
        if self.mosquitto is not None:
            self.mosquitto.restart()
        else:
            assert self.embedded_broker is not None
            self.embedded_broker.stop()
            self.embedded_broker.start()
            wait_until(lambda: accepts(self.host, self.port), timeout=30, what="amqtt")

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
        self.bridge.stop()
        if self.api is not None:
            self.api.stop()
        if self.embedded_broker is not None:
            self.embedded_broker.stop()
        if self.mosquitto is not None:
            self.mosquitto.close()
        self.engine.dispose()


#: The migrated database every PostgreSQL test database is copied from (the
#: ``postgres`` fixture creates it once per session).
TEMPLATE_DATABASE = "mqchat_template"


def template_copy(postgres: PostgresServer, prefix: str = "mqchat") -> str:
    """A new database copied from :data:`TEMPLATE_DATABASE`; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    postgres.create_database(name, template=TEMPLATE_DATABASE)
    return postgres.url(name)


def bridge_env(database_url: str, host: str, port: int, password: str) -> dict[str, str]:
    """The test bridge's environment, written from a settings object as ``mqchat up``
    writes it (``core.daemon.environment``): a renamed setting fails here, loudly."""
    settings = BridgeSettings(
        database_url=database_url,
        mqtt_host=host,
        mqtt_port=port,
        password=SecretStr(password),
        keepalive=5,
        # Throughput tests send hundreds a second; the rate-limit tests set their own.
        message_rate="10000/second",
        uplink_rate="10000/second",
    )
    return daemon.environment(settings)


def start_embedded_broker(
    base: Path,
    database_url: str,
    env: dict[str, str] | None = None,
    *,
    timeout: float = 30,
    module: str = "broker",
) -> tuple[Daemon, int, str]:
    """Start ``python -m broker`` (amqtt) over ``database_url`` on a free loopback port
    and wait until it accepts connections. Blocking. ``module``: another entry point
    of the same broker (the load benchmark's ``bench._amqtt_raw``).

    Returns:
        The daemon, its MQTT port and the bridge's (random) password.
    """
    port = free_port()
    bridge_password = secrets.token_urlsafe(16)
    broker = Daemon(
        "broker",
        module,
        {
            "MQCHAT_BROKER_DATABASE_URL": database_url,
            "MQCHAT_BROKER_PORT": str(port),
            "MQCHAT_BROKER_WS_PORT": str(free_port()),
            "MQCHAT_BROKER_BRIDGE_PASSWORD": bridge_password,
            # Test and benchmark clients all come from loopback, many at once; the
            # per-source connection limit (tests/test_broker_throttle.py sets its own)
            # is not what they are about.
            "MQCHAT_BROKER_CONNECT_RATE": "100000/second",
            **(env or {}),
        },
        base,
    )
    broker.start()

    def accepting() -> bool:
        if broker.process is not None and broker.process.poll() is not None:
            raise RuntimeError(f"amqtt exited:\n{broker.log_text()[-3000:]}")
        return accepts("127.0.0.1", port)

    try:
        wait_until(accepting, timeout=timeout, what="amqtt")
    except BaseException:
        broker.stop()
        raise
    return broker, port, bridge_password


async def start_embedded_stack(base: Path, broker_env: dict[str, str] | None = None) -> Stack:
    db_url = f"sqlite:///{base / 'mqchat.db'}"
    engine = make_engine(db_url)
    migrate(engine)
    broker, port, bridge_password = await asyncio.to_thread(
        start_embedded_broker,
        base,
        db_url,
        {
            "MQCHAT_BROKER_ACCOUNT_POLL": "0.2",
            # Churn tests connect one user hundreds of times a minute on purpose;
            # tests/test_signin_bound.py sets the default back where it is the subject.
            "MQCHAT_BROKER_SIGN_INS_PER_USER": "100000/minute",
            "MQCHAT_BROKER_SIGN_INS_PER_SECOND": "100000",
            # Like the bridge's rates: tests/test_publish_quota.py sets its own.
            "MQCHAT_BROKER_PUBLISH_RATE": "0",
            **(broker_env or {}),
        },
    )
    env = bridge_env(db_url, "127.0.0.1", port, bridge_password)
    bridge = Daemon("bridge", "bridge", env, base)
    stack = Stack(
        "embedded", "127.0.0.1", port, db_url, engine, bridge, env, base, embedded_broker=broker
    )
    await asyncio.to_thread(stack.start_bridge)
    return stack


async def start_production_stack(
    base: Path, postgres: PostgresServer, *, tls_cert: tuple[bytes, bytes] | None = None
) -> Stack:
    db_url = template_copy(postgres)
    engine = make_engine(db_url)
    mosq = await asyncio.to_thread(
        # The publish quota off, as on the embedded stack (test_publish_quota sets one).
        partial(start_mosquitto, base, tls_cert=tls_cert, settings=TEST_MOSQUITTO_SETTINGS)
    )
    env = bridge_env(db_url, mosq.host, mosq.port, mosq.bridge.password)
    bridge = Daemon("bridge", "bridge", env, base)
    stack = Stack(
        "production", mosq.host, mosq.port, db_url, engine, bridge, env, base, mosquitto=mosq
    )
    await asyncio.to_thread(stack.start_bridge)
    return stack


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
    stack.bridge.env.update(MQCHAT_BRIDGE_PARTITIONS="2", MQCHAT_BRIDGE_PARTITION="0")
    await asyncio.to_thread(stack.start_bridge)
    second = Daemon(
        "bridge-2",
        "bridge",
        {
            **stack.bridge_env,
            "MQCHAT_BRIDGE_PARTITIONS": "2",
            "MQCHAT_BRIDGE_PARTITION": "1",
            "MQCHAT_BRIDGE_CLIENT_ID": "mqchat-bridge-2",
        },
        stack.base_dir,
    )
    second.start()
    await asyncio.to_thread(second.wait_for_log, BRIDGE_READY)
    return second
