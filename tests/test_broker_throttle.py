"""The embedded broker's gate under attack: failed sign-ins per username and per
source address, connections per source, and CONNECTs that never come.

Each test runs ``python -m broker`` of its own with tight limits (the shared stacks
are generous, since every test client comes from 127.0.0.1). Refusals are CONNACK
return codes: 5 (not authorised) for wrong credentials, 3 (server unavailable) while
throttled, which paho reports as "Not authorized" / "Server unavailable".
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from core.accounts import EmbeddedProvisioner, register
from core.mqtt import ConnectRefused, LinkConfig, MqttLink
from store import make_engine, migrate

from .support.services import Daemon, free_port
from .support.stack import password_of

NOT_AUTHORIZED = "Not authorized"
SERVER_UNAVAILABLE = "Server unavailable"
BRIDGE = "mqchat-bridge"


class Broker:
    def __init__(self, port: int, ws_port: int, bridge_password: str) -> None:
        self.port = port
        self.ws_port = ws_port
        self.bridge_password = bridge_password

    async def connect(self, user: str, password: str, *, websockets: bool = False) -> str | None:
        """Sign in once: None if accepted (then disconnect), else paho's refusal reason."""
        link = MqttLink(
            LinkConfig(
                host="127.0.0.1",
                port=self.ws_port if websockets else self.port,
                transport="websockets" if websockets else "tcp",
                username=user,
                password=password,
                client_id=f"{user}:{secrets.token_hex(3)}",
                clean_session=True,
                connect_timeout=5.0,
            )
        )
        try:
            await link.connect()
        except ConnectRefused as exc:
            return exc.reason
        finally:
            await link.close()
        return None


StartBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[StartBroker]:
    daemons: list[Daemon] = []

    async def start(**limits: str) -> Broker:
        url = f"sqlite:///{tmp_path / 'mqchat.db'}"
        engine = make_engine(url)
        migrate(engine)
        for name in ("alice", "bob", "carol"):
            await register(engine, EmbeddedProvisioner(), name, password_of(name))
        engine.dispose()
        port, ws_port = free_port(), free_port()
        bridge_password = secrets.token_urlsafe(16)
        env = {
            "MQCHAT_BROKER_DATABASE_URL": url,
            "MQCHAT_BROKER_PORT": str(port),
            "MQCHAT_BROKER_WS_PORT": str(ws_port),
            "MQCHAT_BROKER_BRIDGE_PASSWORD": bridge_password,
            **{f"MQCHAT_BROKER_{key.upper()}": value for key, value in limits.items()},
        }
        daemon = Daemon("broker", "broker", env, tmp_path)
        daemons.append(daemon)
        daemon.start()
        # Wait on the log, not by connecting: a probe would count as a connection.
        await asyncio.to_thread(daemon.wait_for_log, "embedded broker listening")
        return Broker(port, ws_port, bridge_password)

    yield start
    for daemon in daemons:
        assert daemon.stop() == 0, daemon.log_text()[-2000:]


async def test_failures_for_one_user_lock_that_user_only(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(auth_failures_per_user="3/minute")
    for _ in range(3):
        assert await broker.connect("alice", "not alices password") == NOT_AUTHORIZED

    # Now even the right password is refused, with "try later" rather than "wrong".
    assert await broker.connect("alice", password_of("alice")) == SERVER_UNAVAILABLE
    assert await broker.connect("bob", password_of("bob")) is None


async def test_successes_do_not_count(start_broker: StartBroker) -> None:
    broker = await start_broker(auth_failures_per_user="2/minute")
    for _ in range(5):
        assert await broker.connect("alice", password_of("alice")) is None
    assert await broker.connect("alice", "wrong password") == NOT_AUTHORIZED
    assert await broker.connect("alice", password_of("alice")) is None


async def test_failures_from_one_source_lock_that_source(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(auth_failures_per_source="3/minute")
    for user in ("alice", "bob", "nobody"):
        assert await broker.connect(user, "a guess") == NOT_AUTHORIZED

    assert await broker.connect("carol", password_of("carol")) == SERVER_UNAVAILABLE


async def test_guessing_the_bridge_password_does_not_lock_the_bridge_out(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(auth_failures_per_user="2/minute")
    for _ in range(4):
        assert await broker.connect(BRIDGE, "a guess") == NOT_AUTHORIZED

    assert await broker.connect(BRIDGE, broker.bridge_password) is None


async def test_connection_rate_per_source(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(connect_rate="3/minute")
    for _ in range(3):
        assert await broker.connect("alice", password_of("alice")) is None

    assert await broker.connect("alice", password_of("alice")) == SERVER_UNAVAILABLE
    assert await broker.connect("bob", password_of("bob")) == SERVER_UNAVAILABLE


async def test_a_silent_connection_is_closed_and_others_are_served(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(connect_timeout="0.5")
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    try:
        assert await broker.connect("alice", password_of("alice")) is None
        # The broker hangs up on the one that never sent a CONNECT.
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_gate_guards_the_websocket_listener_too(start_broker: StartBroker) -> None:
    broker = await start_broker(auth_failures_per_user="2/minute")
    assert await broker.connect("alice", password_of("alice"), websockets=True) is None
    for _ in range(2):
        assert await broker.connect("alice", "a guess", websockets=True) == NOT_AUTHORIZED

    assert await broker.connect("alice", password_of("alice"), websockets=True) == (
        SERVER_UNAVAILABLE
    )
    assert await broker.connect("bob", password_of("bob"), websockets=True) is None
