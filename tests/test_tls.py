"""Transport security: MQTT over TLS, WebSocket over TLS and HTTPS, with a throwaway CA.

Both brokers get TLS listeners from their production configuration (amqtt through
``MQCHAT_BROKER_TLS_*``, mosquitto through the commented-out example in
``mosquitto.conf``), with a certificate for 127.0.0.1 issued by a CA that ``trustme``
makes for the test. The bridge stays on the plain loopback listener, as documented.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from broker.mosquitto import TlsListeners, render_config
from core.mqtt import LinkConfig, MqttError, MqttLink, tls_context
from mqchat import ChatClient, ChatMessage, ConnectError, HistoryClient

from .support.services import ROOT, Daemon, PostgresServer, accepts, free_port, wait_until
from .support.stack import (
    Stack,
    migrated_sqlite,
    password_of,
    running,
    start_embedded_stack,
    start_production_stack,
)

MQCHAT = Path(sys.executable).parent / "mqchat"
CLI_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MQCHAT_")}


async def mqchat(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a stock user runs it, to its end; in a thread, so that the clients
    of the test (on this event loop) keep receiving meanwhile."""
    return await asyncio.to_thread(
        subprocess.run,
        [str(MQCHAT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=CLI_ENV,
    )


@dataclass
class Pki:
    """A CA, a server certificate from it for 127.0.0.1, and a CA nobody uses."""

    ca_file: Path
    other_ca_file: Path
    cert_chain: bytes
    key: bytes
    cert_file: Path
    key_file: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(
        ca_file=tmp_path / "ca.pem",
        other_ca_file=tmp_path / "other-ca.pem",
        cert_chain=b"".join(blob.bytes() for blob in server.cert_chain_pems),
        key=server.private_key_pem.bytes(),
        cert_file=tmp_path / "server.pem",
        key_file=tmp_path / "server.key",
    )
    ca.cert_pem.write_to_path(str(pki.ca_file))
    trustme.CA().cert_pem.write_to_path(str(pki.other_ca_file))
    pki.cert_file.write_bytes(pki.cert_chain)
    pki.key_file.write_bytes(pki.key)
    pki.key_file.chmod(0o600)
    return pki


@dataclass
class TlsStack:
    stack: Stack
    mqtts_port: int
    wss_port: int


@pytest.fixture(params=["embedded", "production"])
async def tls_stack(
    request: pytest.FixtureRequest, tmp_path: Path, pki: Pki
) -> AsyncIterator[TlsStack]:
    base = tmp_path / "stack"
    base.mkdir()
    if request.param == "embedded":
        mqtts, wss = free_port(), free_port()
        starting = start_embedded_stack(
            base,
            {
                "MQCHAT_BROKER_TLS_CERTFILE": str(pki.cert_file),
                "MQCHAT_BROKER_TLS_KEYFILE": str(pki.key_file),
                "MQCHAT_BROKER_TLS_PORT": str(mqtts),
                "MQCHAT_BROKER_WSS_PORT": str(wss),
            },
        )
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        starting = start_production_stack(base, postgres, tls_cert=(pki.cert_chain, pki.key))
    async with running(starting) as stack:
        if request.param == "embedded":
            await asyncio.to_thread(
                wait_until,
                lambda: accepts("127.0.0.1", mqtts) and accepts("127.0.0.1", wss),
                timeout=30,
                what="amqtt TLS listeners",
            )
        else:
            assert stack.mosquitto is not None
            assert stack.mosquitto.tls is not None
            mqtts, wss = stack.mosquitto.tls.port, stack.mosquitto.tls.ws_port
        yield TlsStack(stack, mqtts, wss)


@contextlib.asynccontextmanager
async def chat_client(
    user: str, port: int, tls: ssl.SSLContext, **options: object
) -> AsyncIterator[ChatClient]:
    client = ChatClient(
        host="127.0.0.1",
        port=port,
        username=user,
        password=password_of(user),
        device="tls",
        tls=tls,
        resend_after=2.0,
        **options,  # type: ignore[arg-type]
    )
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def next_from(client: ChatClient, sender: str) -> ChatMessage:
    """The next message from ``sender`` (echoes of one's own messages come too)."""
    while True:
        message = await client.next_message(timeout=20)
        if message.sender == sender:
            return message


def raw_link(user: str, port: int, **options: object) -> MqttLink:
    config = LinkConfig(
        host="127.0.0.1",
        port=port,
        username=user,
        password=password_of(user),
        client_id=f"{user}:probe",
        clean_session=True,
        connect_timeout=5.0,
        **options,  # type: ignore[arg-type]
    )
    return MqttLink(config)


async def test_chat_over_mqtts_and_wss(tls_stack: TlsStack, pki: Pki) -> None:
    stack = tls_stack.stack
    await stack.add_users("alice", "bob")
    trusted = tls_context(pki.ca_file)
    async with (
        chat_client("alice", tls_stack.mqtts_port, trusted) as alice,
        chat_client("bob", tls_stack.wss_port, trusted, transport="websockets") as bob,
    ):
        sent = await alice.send("over tls", to="bob", timeout=20)
        got = await next_from(bob, "alice")
        assert (got.body, got.seq) == ("over tls", sent.seq)
        await bob.send("over wss", to="alice", timeout=20)
        assert (await next_from(alice, "bob")).body == "over wss"

        # The CLI, as a stock user would run it: WebSocket over TLS with a private CA.
        result = await mqchat(
            "send",
            "--to",
            "bob",
            "--port",
            str(tls_stack.wss_port),
            "--websockets",
            "--tls-ca",
            str(pki.ca_file),
            "--user",
            "alice",
            "--password",
            password_of("alice"),
            "from the cli",
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"sent {sent.conversation} #")
        assert (await next_from(bob, "alice")).body == "from the cli"


async def test_tls_ports_refuse_plain_and_untrusted_clients(tls_stack: TlsStack, pki: Pki) -> None:
    await tls_stack.stack.add_users("alice")
    # Plain MQTT to the TLS port: no CONNACK ever comes.
    plain = raw_link("alice", tls_stack.mqtts_port)
    with pytest.raises((MqttError, OSError, TimeoutError)):
        await plain.connect()
    await plain.close()
    # A certificate from a CA the client does not trust: the handshake fails.
    for port, transport in ((tls_stack.mqtts_port, "tcp"), (tls_stack.wss_port, "websockets")):
        untrusted = raw_link("alice", port, tls=tls_context(pki.other_ca_file), transport=transport)
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.connect()
        await untrusted.close()
    # The CLI says so, with its "unreachable" exit code.
    result = await mqchat(
        "send",
        "--to=alice",
        f"--port={tls_stack.mqtts_port}",
        f"--tls-ca={pki.other_ca_file}",
        "--user=alice",
        f"--password={password_of('alice')}",
        "never sent",
    )
    assert result.returncode == 69, result.stderr
    assert "certificate verify failed" in result.stderr
    # The broker serves on: a trusting client still gets in.
    good = raw_link("alice", tls_stack.mqtts_port, tls=tls_context(pki.ca_file))
    await good.connect()
    await good.close()


async def test_history_api_over_https(tmp_path: Path, pki: Pki) -> None:
    url = migrated_sqlite(tmp_path / "api.db", "alice")
    port = free_port()
    api = Daemon(
        "api",
        "history_api",
        {
            "MQCHAT_API_DATABASE_URL": url,
            "MQCHAT_API_PORT": str(port),
            "MQCHAT_API_TLS_CERTFILE": str(pki.cert_file),
            "MQCHAT_API_TLS_KEYFILE": str(pki.key_file),
        },
        tmp_path,
    )
    api.start()
    try:
        await asyncio.to_thread(api.wait_for_log, "Uvicorn running on https://")
        base = f"https://127.0.0.1:{port}"
        trusting = HistoryClient(
            base, "alice", password_of("alice"), verify=tls_context(pki.ca_file)
        )
        try:
            assert await trusting.conversations() == []
        finally:
            await trusting.close()

        system_ca = HistoryClient(base, "alice", password_of("alice"))
        try:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await system_ca.conversations()
        finally:
            await system_ca.close()

        async with httpx.AsyncClient(timeout=10) as plain:
            with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
                await plain.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        api.stop()


def test_the_documented_tls_example_is_what_runs(tmp_path: Path) -> None:
    """render_config turns on exactly the commented TLS lines of mosquitto.conf."""
    template = (ROOT / "mosquitto.conf").read_text()
    common = {"host": "127.0.0.1", "port": 1, "ws_port": 2, "data_dir": tmp_path}
    plain = render_config(template, **common)
    assert "certfile" not in [line.split(" ")[0] for line in plain.splitlines()]
    tls = TlsListeners(3, 4, tmp_path / "c.pem", tmp_path / "k.pem")
    rendered = render_config(template, **common, tls=tls).splitlines()
    enabled = [line for line in template.splitlines() if re.match(r"#[a-z_]+ ", line)]
    assert len(enabled) == 8
    listeners = [line for line in rendered if line.startswith("listener ")]
    assert listeners == [f"listener {port} 127.0.0.1" for port in (1, 2, 3, 4)]
    assert rendered.count(f"certfile {tls.certfile}") == 2
    assert rendered.count(f"keyfile {tls.keyfile}") == 2
    # An operator's file with TLS already on is rendered only when TLS is asked for.
    turned_on = "\n".join(line[1:] if line in enabled else line for line in template.splitlines())
    assert render_config(turned_on, **common, tls=tls).splitlines() == rendered
    with pytest.raises(ValueError, match="expected listeners"):
        render_config(turned_on, **common)
