"""paho's private methods that ``core/_paho.py`` replaces: each replacement does its job,
and the names it replaces are still paho's.

Each behaviour test fails with its override removed: the read-ahead ones and the
reconnect one talk to a loopback server that feeds bytes (real sockets, the kernel's
receive queue observed directly), the PUBACK one to a real mosquitto, the TLS one to
a loopback TLS server whose certificate the client refuses. The last two compare
paho's signatures with the ones the overrides were written against (and make sure a
new override is added to that list), so that a paho upgrade fails here first.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from core._paho import PUBACK_SUCCESS, PahoClient
from protocol import topics

from .support.services import MosquittoServer, start_mosquitto

CONNACK = b"\x20\x02\x00\x00"  # MQTT 3.1.1: accepted, no session present
TIMEOUT = 10.0


def publish(topic: bytes, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH, as a broker would send it (MQTT 3.1.1 3.3)."""
    body = struct.pack("!H", len(topic)) + topic + payload
    length, remaining = bytearray(), len(body)
    while True:
        remaining, digit = divmod(remaining, 128)
        length.append(digit | (0x80 if remaining else 0))
        if not remaining:
            return b"\x30" + bytes(length) + body


def payloads(*values: bytes) -> bytes:
    return b"".join(publish(b"t", value) for value in values)


class FeedServer:
    """A loopback listener that answers each CONNECT with bytes given by the test."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []

    def answer(self, feed: bytes) -> None:
        """Accept the client's connection, take its CONNECT, send ``feed`` in one write."""
        conn, _ = self.listener.accept()
        self.connections.append(conn)
        conn.settimeout(TIMEOUT)
        assert conn.recv(65536)[:1] == b"\x10", "the client sends CONNECT first"
        conn.sendall(feed)

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.listener.close()


class Receiver:
    """A :class:`PahoClient` as ``core.mqtt.MqttLink`` makes it, driven by hand."""

    def __init__(self, port: int) -> None:
        self.messages: list[bytes] = []
        self.client = PahoClient(
            CallbackAPIVersion.VERSION2,
            client_id="paho-overrides",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        self.client.on_message = lambda _c, _u, msg: self.messages.append(bytes(msg.payload))
        self.client.connect("127.0.0.1", port, keepalive=60)

    @property
    def sock(self) -> socket.socket:
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        return sock

    def wait_in_kernel(self, size: int) -> None:
        """Wait until the socket's receive queue holds ``size`` bytes (no polling:
        SO_RCVLOWAT keeps the socket unreadable until then)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
        try:
            readable, _, _ = select.select([self.sock], [], [], TIMEOUT)
            assert readable, f"{size} bytes did not arrive"
        finally:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def in_kernel(self) -> int:
        """Bytes the kernel holds for this socket that nobody has read."""
        try:
            return len(self.sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return 0

    def drain(self, count: int) -> list[bytes]:
        """Run paho's reads, as the link's reader does, until ``count`` messages came."""
        deadline = time.monotonic() + TIMEOUT
        while len(self.messages) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(self.messages)} of {count} messages arrived"
            if not self.client.buffered():
                select.select([self.sock], [], [], remaining)
            self.client.loop_read()
        return self.messages

    def close(self) -> None:
        self.client.drop_socket()


@pytest.fixture
def server() -> Iterator[FeedServer]:
    server = FeedServer()
    try:
        yield server
    finally:
        server.close()


# -- _sock_recv: read-ahead -----------------------------------------------------------


def test_one_recv_takes_every_packet_waiting_in_the_kernel(server: FeedServer) -> None:
    sent = [b"m%02d" % i for i in range(20)]
    feed = CONNACK + payloads(*sent)
    receiver = Receiver(server.port)
    try:
        server.answer(feed)
        receiver.wait_in_kernel(len(feed))

        receiver.client.loop_read()  # paho reads one packet, the CONNACK

        assert receiver.client.is_connected()
        # paho alone would have asked the socket for 4 bytes: 1 + 1 + 2.
        assert receiver.in_kernel() == 0
        assert receiver.client.buffered() == len(feed) - len(CONNACK)
        assert receiver.drain(len(sent)) == sent
        assert receiver.client.buffered() == 0
    finally:
        receiver.close()


def test_a_packet_longer_than_the_read_ahead_arrives_whole(server: FeedServer) -> None:
    big = bytes(range(256)) * (2 * PahoClient.READ_AHEAD // 256) + b"tail"
    sent = [b"before", big, b"after"]
    first = CONNACK + publish(b"t", b"before")
    receiver = Receiver(server.port)
    try:
        server.answer(first + payloads(big, b"after"))
        receiver.wait_in_kernel(len(first) + 1)

        receiver.client.loop_read()

        assert receiver.client.buffered() > 0, "read ahead past the CONNACK"
        assert receiver.drain(len(sent)) == sent
    finally:
        receiver.close()


# -- _sock_close: read-ahead dropped with its connection -------------------------------


def test_a_reconnect_starts_without_the_old_connections_bytes(server: FeedServer) -> None:
    old = CONNACK + payloads(b"old-1", b"old-2")
    receiver = Receiver(server.port)
    try:
        server.answer(old)
        receiver.wait_in_kernel(len(old))
        receiver.client.loop_read()
        assert receiver.client.buffered() == len(old) - len(CONNACK)

        receiver.client.reconnect()
        server.answer(CONNACK + payloads(b"new"))

        assert receiver.drain(1) == [b"new"]
        assert receiver.client.buffered() == 0
    finally:
        receiver.close()


# -- _handle_pubackcomp: a 3.1.1 PUBACK read directly ------------------------------------


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    with contextlib.closing(start_mosquitto(tmp_path)) as server:
        yield server


def test_pubacks_complete_publishes_with_the_shared_success_pair(
    mosquitto: MosquittoServer,
) -> None:
    acks: list[tuple[int, Any, Any]] = []
    client = PahoClient(
        CallbackAPIVersion.VERSION2,
        client_id="paho-overrides-puback",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
    )
    client.username_pw_set(mosquitto.bridge.username, mosquitto.bridge.password)
    # One in flight: the other four wait in paho's queue until a PUBACK frees the slot,
    # so every one of them completing shows the in-flight bookkeeping kept.
    client.max_inflight_messages_set(1)
    client.on_publish = lambda _c, _u, mid, reason, properties: acks.append(
        (mid, reason, properties)
    )
    client.connect(mosquitto.host, mosquitto.port, keepalive=60)
    try:
        infos = [client.publish(topics.down_msg("alice"), b"%d" % i, qos=1) for i in range(5)]
        deadline = time.monotonic() + TIMEOUT
        while len(acks) < len(infos) and time.monotonic() < deadline:
            client.loop(0.1)

        assert [mid for mid, _, _ in acks] == [info.mid for info in infos]
        assert all(info.is_published() for info in infos)
        for _, reason, properties in acks:
            assert reason is PUBACK_SUCCESS[0]
            assert properties is PUBACK_SUCCESS[1]
        assert not PUBACK_SUCCESS[0].is_failure
    finally:
        client.disconnect()
        client.drop_socket()


# -- _ssl_wrap_socket: a failed handshake closes its socket ------------------------------


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class RefusedTlsServer:
    """A loopback TLS server on a thread, for clients that will refuse its certificate.

    It reports each connection it has closed, so the test can count descriptors
    while none of the server's own are open.
    """

    def __init__(self, cert: trustme.LeafCert, attempts: int) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.closed: queue.Queue[None] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, args=(attempts,), daemon=True)
        self.thread.start()

    def _serve(self, attempts: int) -> None:
        for _ in range(attempts):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client's alert: it did not trust us
            finally:
                conn.close()
                self.closed.put(None)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(TIMEOUT)


@pytest.mark.parametrize("mistake", ["untrusted CA", "wrong host name"])
def test_a_refused_handshake_leaves_no_descriptor_open(tmp_path: Path, mistake: str) -> None:
    ca = trustme.CA()
    if mistake == "untrusted CA":
        server_cert, trusted = ca.issue_cert("127.0.0.1"), trustme.CA()
    else:
        server_cert, trusted = ca.issue_cert("localhost"), ca
    client_context = ssl.create_default_context()
    trusted.configure_trust(client_context)
    attempts = 5
    server = RefusedTlsServer(server_cert, attempts)
    client = PahoClient(
        CallbackAPIVersion.VERSION2, client_id="paho-overrides-tls", clean_session=True
    )
    client.tls_set_context(client_context)
    # Kept, as a retry loop keeps its last error or a log handler its record: with
    # paho's own method each one holds its half-made SSLSocket, and so its descriptor.
    errors: list[ssl.SSLCertVerificationError] = []
    try:
        before = open_descriptors()
        for _ in range(attempts):
            with pytest.raises(ssl.SSLCertVerificationError) as refused:
                client.connect("127.0.0.1", server.port, keepalive=60)
            errors.append(refused.value)
            server.closed.get(timeout=TIMEOUT)

        assert open_descriptors() == before
        assert client.socket() is None
    finally:
        errors.clear()
        server.close()


# -- the names replaced are still paho's ------------------------------------------------

#: What core/_paho.py was written against: paho-mqtt 2.2's private methods it overrides
#: (and ``_do_on_publish``, which its PUBACK path calls), with their signatures.
PAHO_INTERNALS = {
    "_sock_recv": "(self, bufsize: 'int') -> 'bytes'",
    "_sock_close": "(self) -> 'None'",
    "_handle_pubackcomp": "(self, cmd: \"Literal['PUBACK', 'PUBCOMP']\") -> 'MQTTErrorCode'",
    "_ssl_wrap_socket": "(self, tcp_sock: '_socket.socket') -> 'ssl.SSLSocket'",
    "_do_on_publish": (
        "(self, mid: 'int', reason_code: 'ReasonCode', properties: 'Properties') -> 'MQTTErrorCode'"
    ),
}
#: paho's private attributes the overrides read.
PAHO_ATTRIBUTES = (
    "_sock",
    "_in_packet",
    "_protocol",
    "_out_messages",
    "_out_message_mutex",
    "_ssl_context",
    "_host",
    "_connect_timeout",
)


def test_paho_still_has_the_internals_the_overrides_replace() -> None:
    """If this fails after a paho upgrade, port core/_paho.py (its docstring says how)."""
    assert [name for name in PAHO_INTERNALS if not hasattr(paho.Client, name)] == []
    found = {name: str(inspect.signature(getattr(paho.Client, name))) for name in PAHO_INTERNALS}
    assert found == PAHO_INTERNALS, f"paho-mqtt {version('paho-mqtt')} changed its internals"
    fresh = paho.Client(CallbackAPIVersion.VERSION2)
    assert [name for name in PAHO_ATTRIBUTES if not hasattr(fresh, name)] == []
    assert "packet" in fresh._in_packet


def test_every_private_override_is_checked_above() -> None:
    """An override added to core/_paho.py must be added to PAHO_INTERNALS too."""
    overrides = {
        name
        for name, value in vars(PahoClient).items()
        if callable(value) and name.startswith("_") and not name.startswith("__")
    }
    assert overrides <= set(PAHO_INTERNALS)
