"""A lean MQTT 3.1.1 device for the connection benchmark, and the worker that runs many.

Why not a library: amqtt's ``MQTTClient`` (installed) measured 48 KiB of Python heap
per connection and 844 connects/s for 500 clients in one process, and it cannot bind
a source address, which a storm past one address's ~28k ephemeral ports needs.
gmqtt and aiomqtt are not dependencies of mqchat, and paho (the one we have) wants a
network loop per client. What one idle device needs is five packet types, so this
module speaks exactly those (built by ``tests.support.packets``, which the tests'
malformed-packet clients share): CONNECT (with username, password and a last will),
SUBSCRIBE, PUBLISH QoS 1 (and PUBACK for what it receives), PINGREQ. It is a load
generator only (this benchmark's devices and ``bench._gen``'s chat users); mqchat's
clients stay on paho (``core/mqtt.py``).

Run as ``python -m bench._conn_client``: a worker process that reads JSON commands on
stdin and writes JSON events on stdout (one per line), so that several of them can
share the work and each stay under the per-process file-descriptor limit.

Commands::

    {"cmd": "connect", "first": 0, "count": 1000, "total": 50000}
    {"cmd": "status"}
    {"cmd": "quit"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import topics
from tests.support import packets
from tests.support.packets import CONNACK, PINGREQ_BYTES, PUBACK, PUBLISH, SUBACK

#: Linux's IP_BIND_ADDRESS_NO_PORT: bind the source address now, choose the port at
#: connect(), so ports are only unique per (source, destination) pair.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

DEVICE = "bench"


def username(index: int) -> str:
    """The bench account of device ``index`` (valid under ``topics.USERNAME_RE``)."""
    return f"b{index:06d}"


def source_address(index: int) -> str:
    """A loopback source address for device ``index``: 250 devices per address."""
    block, host = divmod(index, 250)
    return f"127.{1 + block // 250}.{block % 250}.{host + 1}"


def presence_payload(state: str) -> bytes:
    # What the SDK sends (protocol.UpPresence), spelled out to keep the worker lean.
    return json.dumps({"device": DEVICE, "state": state}, separators=(",", ":")).encode()


class HandshakeError(Exception):
    """The broker refused or dropped a device before it was fully connected."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Device(asyncio.Protocol):
    """One connection; keeps only what it needs to answer the broker."""

    __slots__ = (
        "buffer",
        "closed",
        "lost",
        "next_id",
        "on_publish",
        "received",
        "transport",
        "waiting",
    )

    def __init__(self, on_publish: Callable[[str, bytes], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        #: packet type (CONNACK) or packet id -> the future waiting for it.
        self.waiting: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self.next_id = 0
        self.closed = False
        self.received = 0
        self.lost: WorkerState | None = None
        #: Called with (topic, payload) of every PUBLISH received (before its PUBACK).
        self.on_publish = on_publish

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(HandshakeError("closed_by_broker"))
        self.waiting.clear()
        if self.lost is not None:
            self.lost.lost += 1

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 2:
            length, multiplier, pos = 0, 1, 1
            while True:
                if pos >= len(buffer):
                    return
                digit = buffer[pos]
                length += (digit & 0x7F) * multiplier
                multiplier *= 128
                pos += 1
                if not digit & 0x80:
                    break
            end = pos + length
            if len(buffer) < end:
                return
            first = buffer[0]
            body = bytes(buffer[pos:end])
            del buffer[:end]
            self._packet(first >> 4, first & 0x0F, body)

    def _packet(self, kind: int, flags: int, body: bytes) -> None:
        if kind == PUBLISH:
            self.received += 1
            (topic_length,) = struct.unpack_from("!H", body)
            payload_at = 2 + topic_length
            packet_id = b""
            if (flags >> 1) & 0x03:
                packet_id = body[payload_at : payload_at + 2]
                payload_at += 2
            if self.on_publish is not None:
                self.on_publish(body[2 : 2 + topic_length].decode(), body[payload_at:])
            if packet_id:
                self.send(packets.puback(packet_id))
        elif kind == CONNACK:
            self._resolve((CONNACK, 0), body)
        elif kind in (SUBACK, PUBACK):
            (packet_id,) = struct.unpack_from("!H", body)
            self._resolve((kind, packet_id), body)

    def _resolve(self, key: tuple[int, int], body: bytes) -> None:
        future = self.waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(body)

    def send(self, data: bytes) -> None:
        # is_closing: the broker may have closed it before connection_lost has run
        # (a flooder cut off by the publish quota); writing then only logs warnings.
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def expect(self, kind: int, packet_id: int = 0) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[(kind, packet_id)] = future
        return future

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[bytes]:
        """PUBLISH at QoS 1; the future resolves with the PUBACK."""
        packet_id = self.packet_id()
        acked = self.expect(PUBACK, packet_id)
        self.send(packets.publish(topic, payload, qos=1, packet_id=packet_id))
        return acked

    def subscribe(self, filters: list[tuple[str, int]]) -> asyncio.Future[bytes]:
        """SUBSCRIBE; the future resolves with the SUBACK body (its granted codes from
        byte 2 on, 0x80 for a refused filter)."""
        packet_id = self.packet_id()
        acked = self.expect(SUBACK, packet_id)
        self.send(packets.subscribe(filters, packet_id))
        return acked

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id


@dataclass
class WorkerState:
    host: str
    port: int
    password: str
    keepalive: int
    announce_every: float
    contacts: int
    concurrency: int
    handshake_timeout: float
    devices: dict[int, Device] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    pings: int = 0
    announcements: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def open_device(state: WorkerState, index: int, total: int) -> float:
    """Connect, subscribe and announce ``online`` as device ``index``; CONNACK latency."""
    loop = asyncio.get_running_loop()
    device = Device()
    started = time.perf_counter()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source_address(index), 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (state.host, state.port))
    except OSError as exc:
        sock.close()
        raise HandshakeError(f"tcp_{exc.errno}") from exc
    except BaseException:
        sock.close()
        raise
    await loop.create_connection(lambda: device, sock=sock)
    try:
        return await _handshake(state, device, index, total, started)
    except BaseException:
        if device.transport is not None:
            device.transport.abort()
        raise


async def _handshake(
    state: WorkerState, device: Device, index: int, total: int, started: float
) -> float:
    user = username(index)
    connack = device.expect(CONNACK)
    device.send(
        packets.connect(
            f"{user}:{DEVICE}",
            user,
            state.password,
            clean=False,
            keepalive=state.keepalive,
            will_topic=topics.up(user, "presence"),
            will=presence_payload("offline"),
        )
    )
    body = await connack
    connack_s = time.perf_counter() - started
    if body[1] != 0:
        raise HandshakeError(f"connack_rc_{body[1]}")
    # The device's own downlink (QoS 1, as the SDK), its contacts' presence included.
    filters = [(topics.down_all(user), 1)]
    granted = (await device.subscribe(filters))[2:]
    if any(code == 0x80 for code in granted):
        raise HandshakeError("subscribe_refused")
    await device.publish(topics.up(user, "presence"), presence_payload("online"))
    device.lost = state
    state.devices[index] = device
    return connack_s


async def connect_range(state: WorkerState, first: int, count: int, total: int) -> None:
    gate = asyncio.Semaphore(state.concurrency)
    latencies: list[float] = []
    failed = 0
    done = 0
    started = time.monotonic()

    async def one(index: int) -> None:
        nonlocal failed, done
        async with gate:
            try:
                async with asyncio.timeout(state.handshake_timeout):
                    latencies.append(await open_device(state, index, total))
            except HandshakeError as exc:
                failed += 1
                state.error(exc.kind)
            except TimeoutError:
                failed += 1
                state.error("handshake_timeout")
            except OSError as exc:
                failed += 1
                state.error(f"os_{exc.errno}")
            done += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            emit({"ev": "progress", "done": done, "ok": len(latencies), "failed": failed})

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(one(i) for i in range(first, first + count)))
    finally:
        reporter.cancel()
    emit(
        {
            "ev": "connected",
            "ok": len(latencies),
            "failed": failed,
            "seconds": time.monotonic() - started,
            "connack_ms": [round(s * 1000, 3) for s in latencies],
            "errors": state.errors,
        }
    )


async def keep_alive(state: WorkerState) -> None:
    """Each second, ping one keepalive's worth of devices and re-announce some.

    Device ``i`` pings in second ``i % keepalive`` of each period (well inside the
    1.5 x keepalive the broker allows) and says ``online`` again every
    ``announce_every`` seconds, as the SDK does, so the bridge can expire lost wills.
    """
    tick = 0
    while True:
        await asyncio.sleep(1.0)
        tick += 1
        period = max(1, int(state.keepalive * 0.75))
        announce = int(state.announce_every)
        for index, device in list(state.devices.items()):
            if device.closed:
                continue
            if index % period == tick % period:
                device.send(PINGREQ_BYTES)
                state.pings += 1
            if announce and index % announce == tick % announce:
                user = username(index)
                payload = presence_payload("online")
                topic = topics.up(user, "presence")
                device.send(packets.publish(topic, payload, qos=1, packet_id=device.packet_id()))
                state.announcements += 1


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = json.loads(os.environ["MQCHAT_BENCH_WORKER"])
    state = WorkerState(**config)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pinger = asyncio.create_task(keep_alive(state))
    emit({"ev": "ready", "pid": os.getpid(), "nofile": hard})
    work: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        command = json.loads(line)
        if command["cmd"] == "connect":
            task = asyncio.create_task(
                connect_range(state, command["first"], command["count"], command["total"])
            )
            work.add(task)
            task.add_done_callback(work.discard)
        elif command["cmd"] == "status":
            open_now = sum(1 for d in state.devices.values() if not d.closed)
            emit(
                {
                    "ev": "status",
                    "open": open_now,
                    "lost": state.lost,
                    "received": sum(d.received for d in state.devices.values()),
                    "pings": state.pings,
                    "announcements": state.announcements,
                    "rss_kib": rss_kib(),
                    "errors": state.errors,
                }
            )
        elif command["cmd"] == "quit":
            break
    pinger.cancel()
    for device in state.devices.values():
        if device.transport is not None:
            with contextlib.suppress(Exception):
                device.transport.abort()


if __name__ == "__main__":
    asyncio.run(main())
