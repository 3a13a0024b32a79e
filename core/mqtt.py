"""An MQTT connection driven by the asyncio loop; with ``core/_paho.py`` (paho's client
with a few of its private methods replaced) the only module that imports paho.

paho's own network thread calls back on a thread of its own and reports errors as
return codes. Here paho runs inside the caller's event loop instead (its sockets are
registered with ``add_reader``/``add_writer``), so every callback runs on the loop,
and failures become exceptions::

    MqttError
    ├── ConnectRefused     the broker answered CONNACK with an error (.reason)
    ├── ClosedBeforeConnack  closed with no CONNACK (also a ConnectionError: retry)
    ├── SubscribeRefused   the broker refused a subscription (.topic_filter)
    └── NotConnected       a QoS 0 publish while the link is down

The link reconnects by itself (tenacity, exponential backoff with jitter) and
resubscribes. Incoming QoS 1 messages can be acknowledged manually, after the owner
has processed them; each carries the connection ``generation`` it arrived on,
because after a reconnect the broker resends unacknowledged messages and an old
packet id must not be acknowledged on the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from core._paho import PahoClient

log = logging.getLogger(__name__)


class MqttError(Exception):
    """Base of every error this module raises."""


class ConnectRefused(MqttError):
    """The broker refused the connection (bad credentials, not authorised, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"connection refused: {reason}")
        self.reason = reason

    @property
    def unavailable(self) -> bool:
        """CONNACK 3, "server unavailable": transient by the protocol (a RabbitMQ
        node answers it while its cluster's client-id registry is not ready), so
        worth trying again, unlike a refusal of the credentials."""
        return self.reason == "Server unavailable"


class ClosedBeforeConnack(MqttError, ConnectionError):
    """The broker closed the connection before answering the CONNECT.

    Not a refusal: a broker refuses with a CONNACK (mosquitto, amqtt's gate and
    RabbitMQ all do). A close without one is a broker still booting or overloaded, or
    something in between giving up, so it is an ``OSError`` like an unreachable
    broker: callers that try again, or try the next address, do so (a RabbitMQ node
    of a freshly formed cluster did this for minutes, docs/operations.md).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"connection closed before CONNACK: {reason}")
        self.reason = reason


class SubscribeRefused(MqttError):
    def __init__(self, topic_filter: str) -> None:
        super().__init__(f"subscription refused: {topic_filter}")
        self.topic_filter = topic_filter


class NotConnected(MqttError):
    pass


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def tls_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the broker's certificate and host name.

    Args:
        ca_file: PEM file of the CA(s) to trust (a private CA, or a throwaway one in
            tests); ``None`` trusts the system's CAs.

    Raises:
        OSError: ``ca_file`` cannot be read.
        ssl.SSLError: it holds no usable certificate.
    """
    return ssl.create_default_context(cafile=None if ca_file is None else os.fspath(ca_file))


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Where and as whom to connect.

    ``clean_session`` is always explicit: paho's default of "clean on the first
    connect of the process" would wipe a daemon's queued messages on every restart.
    ``tls`` (see :func:`tls_context`) wraps either transport: MQTT over TLS, or
    WebSocket over TLS (``wss://``).
    """

    host: str
    port: int
    username: str
    password: str
    client_id: str
    clean_session: bool = False
    keepalive: int = 30
    transport: Literal["tcp", "websockets"] = "tcp"
    ws_path: str = "/mqtt"
    tls: ssl.SSLContext | None = None
    will: Will | None = None
    manual_ack: bool = False
    #: QoS 1 publishes on the wire awaiting PUBACK; 0 = no limit (TCP pushes back).
    #: With a limit, paho walks every queued message on each PUBACK: at a few
    #: thousand outstanding that walk was 11 % of the bridge's loop (py-spy).
    max_inflight: int = 0
    max_backoff: float = 5.0
    connect_timeout: float = 10.0
    #: Asked for the password before every connect and reconnect, instead of
    #: ``password``: a short-lived MQTT credential is fetched anew each time
    #: (``core.credentials``), since the one of the last connect may have expired.
    password_provider: Callable[[], Awaitable[str]] | None = None
    #: Other nodes of the same broker cluster (``(host, port)``), tried in turn after
    #: ``host:port`` when connecting and whenever the connection is lost: the session
    #: lives on the cluster, so any node resumes it.
    other_addresses: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.tls is not None and not self.tls.check_hostname:
            raise ValueError("the TLS context must check the broker's host name")


#: Seconds a connection must last after its CONNACK to count as established: one lost
#: sooner is a flap, and the next reconnect waits (``MqttLink._hold_off_after_a_flap``).
STABLE_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class Incoming:
    """One PUBLISH as the link hands it to its owner, who calls :meth:`MqttLink.ack` once
    it is handled (``manual_ack``)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    #: The connection it came on: an ack for an older connection's message is not sent
    #: (the broker redelivers it on the new one).
    generation: int
    #: ``time.monotonic()`` when it reached this process: the start of the bridge's
    #: arrival-to-commit and arrival-to-PUBACK times.
    arrived: float = 0.0


@dataclass
class _Pending:
    publishes: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    subscribes: dict[int, tuple[str, asyncio.Future[int]]] = field(default_factory=dict)


class MqttLink:
    """One MQTT connection, kept up until :meth:`close`.

    Args:
        config: broker address, credentials, session options.
        on_message: called on the event loop for every incoming message. It must not
            block; hand the message to a queue if processing takes time.
        on_connect: called on the loop after every successful (re)connect, with
            ``session_present``.
        on_disconnect: called on the loop when an established connection is lost
            (not on :meth:`close`), with paho's reason. In MQTT 3.1.1 a broker says
            nothing when another connection takes the session over: it just closes
            the socket, so this is the only sign an owner can show its user.
    """

    def __init__(
        self,
        config: LinkConfig,
        *,
        on_message: Callable[[Incoming], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._on_message = on_message
        self._on_connect_hook = on_connect
        self._on_disconnect_hook = on_disconnect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = _Pending()
        self._subscriptions: dict[str, int] = {}
        self._connack: asyncio.Future[None] | None = None
        self._lost = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = False
        self._misc_task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._resubscribe_mid: int | None = None
        self._ready_waiters: list[asyncio.Future[None]] = []
        self._maintain_task: asyncio.Task[None] | None = None
        self.generation = 0
        #: The broker's nodes, ``config.host`` first; ``_address`` is the one in use.
        self._addresses = [(config.host, config.port), *config.other_addresses]
        self._address = 0
        #: When the latest CONNACK came, and how many connections in a row were lost
        #: sooner than STABLE_AFTER after theirs.
        self._connected_at = 0.0
        self._flaps = 0
        self._client = self._make_client()

    # -- public API ---------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def wait_reconnected(self, after_generation: int) -> None:
        """Wait until a connection newer than ``after_generation`` is up and resubscribed."""
        while not (self.generation > after_generation and self.is_connected):
            waiter = self._require_loop().create_future()
            self._ready_waiters.append(waiter)
            await waiter

    async def connect(self) -> None:
        """Connect once, raising if the broker refuses; then stay connected.

        Raises:
            ConnectRefused: wrong credentials or not authorised.
            ClosedBeforeConnack: closed without an answer (an OSError).
            OSError / TimeoutError: the broker cannot be reached.
        """
        self._loop = asyncio.get_running_loop()
        for attempt in range(len(self._addresses)):
            self._use_address(attempt)
            try:
                await self._connect_once(first=True)
                break
            except (OSError, TimeoutError):
                if attempt == len(self._addresses) - 1:
                    raise
        self._maintain_task = asyncio.create_task(self._maintain(), name="mqtt-reconnect")

    async def close(self) -> None:
        """Disconnect cleanly (no last will) and stop reconnecting."""
        self._closing = True
        if self._maintain_task is not None:
            self._lost.set()
            self._maintain_task.cancel()
            await asyncio.wait({self._maintain_task}, timeout=self.config.connect_timeout)
        if self._client.is_connected():
            self._client.disconnect()
            # Give the DISCONNECT packet a chance to reach the socket.
            for _ in range(50):
                if self._client.socket() is None:
                    break
                await asyncio.sleep(0.01)
        self._teardown_socket()
        self._connected.clear()
        for fut in self._pending.publishes.values():
            if not fut.done():
                fut.cancel()
        for _, sfut in self._pending.subscribes.values():
            if not sfut.done():
                sfut.cancel()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (the will fires)."""
        self._closing = True
        if self._maintain_task is not None:
            self._maintain_task.cancel()
        self._teardown_socket()
        self._connected.clear()

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and wait for SUBACK; the subscription is renewed on reconnect.

        Raises:
            SubscribeRefused: the broker's ACL refused the filter.
        """
        loop = self._require_loop()
        fut: asyncio.Future[int] = loop.create_future()
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"cannot subscribe: {paho.error_string(rc)}")
        self._pending.subscribes[mid] = (topic_filter, fut)
        granted = await fut
        self._subscriptions[topic_filter] = qos
        return granted

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a publish; the future resolves when the broker has it (PUBACK for QoS 1).

        A QoS 1 publish made while disconnected is kept by paho and sent after the
        reconnect, so its future still resolves then. A QoS 0 publish while
        disconnected fails with :class:`NotConnected`.
        """
        loop = self._require_loop()
        fut: asyncio.Future[None] = loop.create_future()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                fut.set_result(None)
            else:
                fut.set_exception(NotConnected(paho.error_string(info.rc)))
            return fut
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            fut.set_exception(MqttError(f"publish failed: {paho.error_string(info.rc)}"))
            return fut
        self._pending.publishes[info.mid] = fut
        return fut

    def ack(self, message: Incoming) -> bool:
        """Acknowledge a manually acked QoS 1 message; False if its connection is gone."""
        if message.qos == 0 or message.generation != self.generation or not self.is_connected:
            return False
        rc = self._client.ack(message.mid, message.qos)
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- connection management --------------------------------------------------

    def _make_client(self) -> PahoClient:
        cfg = self.config
        client = PahoClient(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=cfg.clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            transport=cfg.transport,
            manual_ack=cfg.manual_ack,
            reconnect_on_failure=False,
        )
        client.username_pw_set(cfg.username, cfg.password)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        client.connect_timeout = cfg.connect_timeout
        if cfg.transport == "websockets":
            client.ws_set_options(path=cfg.ws_path)
        if cfg.tls is not None:
            client.tls_set_context(cfg.tls)
        if cfg.will is not None:
            w = cfg.will
            client.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        return client

    async def _connect_once(self, *, first: bool = False) -> None:
        """One CONNECT. The password provider's errors reach the caller of the first
        connect as they are; later, they are retried like a broker's refusal."""
        loop = self._require_loop()
        provider = self.config.password_provider
        if provider is not None:
            try:
                password = await provider()
            except Exception as exc:
                if first:
                    raise
                raise MqttError(f"no password for the connection: {exc}") from exc
            self._client.username_pw_set(self.config.username, password)
        self._connack = loop.create_future()
        rc = self._client.reconnect()  # blocking TCP connect; OSError if nobody listens
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise OSError(f"connect failed: {paho.error_string(rc)}")
        try:
            await asyncio.wait_for(self._connack, self.config.connect_timeout)
        except BaseException:
            self._teardown_socket()
            raise

    async def _maintain(self) -> None:
        while not self._closing:
            await self._lost.wait()
            if self._closing:
                return
            await self._hold_off_after_a_flap()
            if self._closing:
                return
            try:
                async for attempt in AsyncRetrying(
                    wait=wait_random_exponential(multiplier=0.05, max=self.config.max_backoff),
                    retry=retry_if_exception_type((OSError, TimeoutError, MqttError)),
                    # A cancel that lands as a refused CONNACK completes is swallowed
                    # by wait_for in 3.11, so closing is also checked here.
                    stop=lambda _: self._closing,
                    reraise=True,
                ):
                    with attempt:
                        if len(self._addresses) > 1:  # the next node: this one may be gone
                            self._use_address(self._address + 1)
                        host, port = self._addresses[self._address]
                        log.info("reconnecting %s to %s:%s", self.config.client_id, host, port)
                        await self._connect_once()
            except (OSError, TimeoutError, MqttError):
                if self._closing:
                    return
                raise

    async def _hold_off_after_a_flap(self) -> None:
        """Wait before reconnecting if the connection just lost lasted under
        :data:`STABLE_AFTER`: longer after each such loss in a row (doubling from
        0.1 s up to ``max_backoff``, full jitter), nothing after a lasting one.

        Two connections with one client id take the session from each other on every
        CONNECT (a second bridge given the same client id, one device twice): without
        this, each reconnected at once and the pair looped hot, 880 reconnects a
        second on mosquitto (tests/test_session_takeover.py).
        """
        if time.monotonic() - self._connected_at >= STABLE_AFTER:
            self._flaps = 0
            return
        self._flaps += 1
        ceiling = min(self.config.max_backoff, 0.05 * 2**self._flaps)
        await asyncio.sleep(random.uniform(0, ceiling))

    def _use_address(self, index: int) -> None:
        """Connect to node ``index`` (modulo their number) from now on."""
        self._address = index % len(self._addresses)
        host, port = self._addresses[self._address]
        self._client.connect_async(host, port, self.config.keepalive)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise NotConnected("connect() first")
        return self._loop

    # -- paho callbacks (all on the event loop) ----------------------------------

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            if self._connack is not None and not self._connack.done():
                self._connack.set_exception(ConnectRefused(str(reason)))
            return
        self.generation += 1
        self._connected_at = time.monotonic()
        if self.generation > 1:
            log.info(
                "%s reconnected (session present: %s)",
                self.config.client_id,
                bool(flags.session_present),
            )
        self._lost.clear()
        if self._subscriptions:
            # Ready only once the broker has the subscriptions back: after a broker
            # restart without persistence, anything routed before that is gone.
            rc, mid = client.subscribe(list(self._subscriptions.items()))
            self._resubscribe_mid = mid if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None
        else:
            self._mark_ready()
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(None)
        if self._on_connect_hook is not None:
            self._safely(self._on_connect_hook, bool(flags.session_present))

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ClosedBeforeConnack(str(reason)))
        if was_connected and not self._closing:
            log.warning("connection of %s lost: %s", self.config.client_id, reason)
            if self._on_disconnect_hook is not None:
                self._safely(self._on_disconnect_hook, str(reason))
        if not self._closing:
            self._lost.set()

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message is None:
            return
        incoming = Incoming(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            mid=msg.mid,
            generation=self.generation,
            arrived=time.monotonic(),
        )
        self._safely(self._on_message, incoming)

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        fut = self._pending.publishes.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any
    ) -> None:
        if mid == self._resubscribe_mid:
            self._resubscribe_mid = None
            if any(r.is_failure for r in reasons):
                log.error("%s: broker refused a resubscription", self.config.client_id)
            self._mark_ready()
            return
        entry = self._pending.subscribes.pop(mid, None)
        if entry is None:
            return
        topic_filter, fut = entry
        if fut.done():
            return
        if any(r.is_failure for r in reasons):
            fut.set_exception(SubscribeRefused(topic_filter))
        else:
            fut.set_result(int(reasons[0].value))

    def _mark_ready(self) -> None:
        self._connected.set()
        for waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._ready_waiters.clear()

    def _safely(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("callback %r failed", fn)

    # -- socket plumbing ----------------------------------------------------------

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        loop = self._require_loop()
        self._fd = sock.fileno()
        # Chat is small messages in both directions: without this, Nagle's
        # algorithm and delayed ACKs add ~40 ms to every round trip.
        with contextlib.suppress(OSError):
            raw = socket.socket(fileno=os.dup(self._fd))
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            finally:
                raw.close()
        loop.add_reader(self._fd, self._readable)
        if self._misc_task is None or self._misc_task.done():
            self._misc_task = loop.create_task(self._misc_loop(), name="mqtt-misc")

    def _readable(self) -> None:
        client = self._client
        client.loop_read()
        sock = client.socket()
        # Bytes the selector cannot see: read ahead by us, or decrypted by a TLS or
        # WebSocket wrapper.
        pending = getattr(sock, "pending", None)
        if sock is not None and (client.buffered() or (pending is not None and pending() > 0)):
            self._require_loop().call_soon(self._readable)

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._unwatch()

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._fd is not None:
            self._require_loop().add_writer(self._fd, self._client.loop_write)

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._fd is not None:
            self._require_loop().remove_writer(self._fd)

    def _unwatch(self) -> None:
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = None

    def _teardown_socket(self) -> None:
        # Reported back through _socket_close above.
        self._client.drop_socket()
        self._unwatch()
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None

    async def _misc_loop(self) -> None:
        # Keepalive pings and the PINGRESP timeout live in loop_misc().
        while self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1)  # a periodic tick, not a wait for an event
