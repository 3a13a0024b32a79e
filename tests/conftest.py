"""Fixtures: the two stacks every end-to-end test runs on.

* ``embedded``: amqtt (``python -m broker``) + bridge + SQLite, as ``mqchat up`` runs it;
* ``production``: mosquitto with the production config and dynsec + bridge + PostgreSQL.

Every service is the real program, started from its binary on free loopback ports;
the bridge always runs as its own process (``python -m bridge``) so that tests can
kill it the way a crash would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from core.accounts import EmbeddedProvisioner, Provisioner, register
from core.daemon import BRIDGE_READY_LOG as READY_LOG
from core.dynsec import DynsecProvisioner
from core.mqtt import Incoming, LinkConfig, MqttLink
from mqchat import ChatClient, HistoryClient
from store import accounts, make_engine, migrate

from .services import (
    MosquittoServer,
    PostgresServer,
    _accepts,
    free_port,
    start_mosquitto,
    start_postgres,
    with_settings,
)

ROOT = Path(__file__).parents[1]
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


def error_of(response: Any) -> tuple[int, str]:
    """An HTTP error answer's status and code, checking the documented ``{"error"}`` shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "detail"}, body
    assert body["error"]["detail"], body
    return int(response.status_code), str(body["error"]["code"])


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """One of our daemons as a child process, with its output in a log file."""

    def __init__(
        self, name: str, module: str, env: dict[str, str], log_dir: Path, tree: Path | None = None
    ) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: Another checkout to run the module from, with its own .venv (benchmarks'
        #: before/after runs); None: this one.
        self.tree = tree
        #: Where the latest start's output begins in the log (restarts append to it).
        self._log_start = 0

    def start(self) -> None:
        self.starts += 1
        python = str(self.tree / ".venv" / "bin" / "python") if self.tree else sys.executable
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()
            self.process = subprocess.Popen(
                [python, "-m", self.module],
                env={**os.environ, **self.env},
                cwd=self.tree or ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_text(self) -> str:
        """Everything every start of this daemon has logged."""
        return self.log_path.read_text(errors="replace")

    def _latest_log(self) -> str:
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def wait_for_log(self, needle: str, *, timeout: float = 30) -> None:
        """Wait until the latest start has logged ``needle`` (earlier starts' lines
        in the same file do not count: a restart must say it again)."""

        def seen() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            return needle in self._latest_log()

        wait_until(seen, timeout=timeout, what=f"{self.name}: {needle!r}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 20) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


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
            wait_until, lambda: _accepts("127.0.0.1", port), timeout=30, what="history API"
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
            wait_until(lambda: _accepts(self.host, self.port), timeout=30, what="amqtt")

    async def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)
        for link in self._links:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.close(), 5)
        self.bridge.stop()
        if self.api is not None:
            self.api.stop()
        if self.embedded_broker is not None:
            self.embedded_broker.stop()
        if self.mosquitto is not None:
            self.mosquitto.close()
        self.engine.dispose()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        server.create_database("mqchat_template")
        engine = make_engine(server.url("mqchat_template"))
        migrate(engine)
        engine.dispose()
        yield server
    finally:
        server.close()


_db_counter = 0


def _bridge_env(database_url: str, host: str, port: int, password: str) -> dict[str, str]:
    return {
        "MQCHAT_BRIDGE_DATABASE_URL": database_url,
        "MQCHAT_BRIDGE_MQTT_HOST": host,
        "MQCHAT_BRIDGE_MQTT_PORT": str(port),
        "MQCHAT_BRIDGE_PASSWORD": password,
        "MQCHAT_BRIDGE_KEEPALIVE": "5",
        # Throughput tests send hundreds a second; the rate-limit tests set their own.
        "MQCHAT_BRIDGE_MESSAGE_RATE": "10000/second",
        "MQCHAT_BRIDGE_UPLINK_RATE": "10000/second",
    }


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
        return _accepts("127.0.0.1", port)

    try:
        wait_until(accepting, timeout=timeout, what="amqtt")
    except BaseException:
        broker.stop()
        raise
    return broker, port, bridge_password


async def _embedded_stack(base: Path, broker_env: dict[str, str] | None = None) -> Stack:
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
    env = _bridge_env(db_url, "127.0.0.1", port, bridge_password)
    bridge = Daemon("bridge", "bridge", env, base)
    stack = Stack(
        "embedded", "127.0.0.1", port, db_url, engine, bridge, env, base, embedded_broker=broker
    )
    await asyncio.to_thread(stack.start_bridge)
    return stack


async def _production_stack(
    base: Path, postgres: PostgresServer, *, tls_cert: tuple[bytes, bytes] | None = None
) -> Stack:
    global _db_counter
    _db_counter += 1
    dbname = f"mqchat_{os.getpid()}_{_db_counter}"
    postgres.create_database(dbname, template="mqchat_template")
    db_url = postgres.url(dbname)
    engine = make_engine(db_url)
    mosq = await asyncio.to_thread(
        # The publish quota off, as on the embedded stack (test_publish_quota sets one).
        partial(start_mosquitto, base, tls_cert=tls_cert, settings=TEST_MOSQUITTO_SETTINGS)
    )
    env = _bridge_env(db_url, mosq.host, mosq.port, mosq.bridge.password)
    bridge = Daemon("bridge", "bridge", env, base)
    stack = Stack(
        "production", mosq.host, mosq.port, db_url, engine, bridge, env, base, mosquitto=mosq
    )
    await asyncio.to_thread(stack.start_bridge)
    return stack


@pytest.fixture(params=["embedded", "production"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "embedded":
        s = await _embedded_stack(tmp_path)
    else:
        s = await _production_stack(tmp_path, request.getfixturevalue("postgres"))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def embedded_broker_env() -> dict[str, str]:
    """Extra ``MQCHAT_BROKER_*`` settings for :func:`embedded`; a test module that needs
    others overrides this fixture."""
    return {}


@pytest.fixture
async def embedded(tmp_path: Path, embedded_broker_env: dict[str, str]) -> AsyncIterator[Stack]:
    """The embedded stack alone, for what only amqtt has (or lacks)."""
    s = await _embedded_stack(tmp_path, embedded_broker_env)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def production_stack(tmp_path: Path, postgres: PostgresServer) -> AsyncIterator[Stack]:
    """For tests about PostgreSQL itself (restarting it, say)."""
    s = await _production_stack(tmp_path, postgres)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_engine(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresServer
) -> Iterator[Engine]:
    """An empty migrated database with alice, bob and carol, on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        global _db_counter
        _db_counter += 1
        name = f"store_{os.getpid()}_{_db_counter}"
        postgres.create_database(name, template="mqchat_template")
        url = postgres.url(name)
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as session:
        for user in ("alice", "bob", "carol"):
            accounts.create(session, user, f"{user}-secret-pw")
        session.commit()
    yield engine
    engine.dispose()
