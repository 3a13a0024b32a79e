"""The load generator: one process, a share of the users, an open-loop schedule.

Each worker process owns whole pairs of users (both sides of a 1:1 conversation), so
a message is sent and received in the same process and needs no cross-process
bookkeeping. Per step the worker gets a rate and a duration; message ``k`` of the step
has the intended send time ``t0 + k / rate`` whatever happened to the messages before
it (open loop: a stalled system does not slow the schedule down, so its stall shows
up as latency instead of hiding as coordinated omission). Latency is measured from
that intended time:

* ``e2e``: to the moment the recipient's connection hands over the downlink message;
* ``sent``: to the ``sent`` receipt on the sender's connection (mqchat only);
* ``puback``: to the broker's PUBACK of the uplink.

Message ids are ``{tag}.{k}``: ``tag`` names the step, so a straggler from an earlier
step is counted as ``stale``, never as this step's message. Receipt of each ``k`` is
kept in a bytearray, which counts duplicates exactly.

Modes:

* ``chat``: the sender publishes an uplink (``chat/v1/u/{me}/up/msg``) and the bridge
  does the rest;
* ``raw``: the sender publishes a downlink-shaped payload straight to the recipient's
  ``chat/v1/u/{them}/down/msg`` (a broker role allows it), no bridge: what the broker
  alone relays for the same topics and sizes.

The main process talks to a worker over a pipe (one dict per command) and reads its
progress counters from shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from hdrh.histogram import HdrHistogram

from protocol import topics
from tests.support import packets
from tests.support.packets import CONNACK, DISCONNECT_BYTES, PINGREQ_BYTES

from ._conn_client import Device

#: A worker's answer to one command of the main process (its fields beside "ok").
Command = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

#: Microseconds, 1 µs to 10 minutes, 3 significant digits.
HIST_MAX_US = 600_000_000
BODY = ("the harbour at six? bring the maps and the spare battery, we leave at dawn " * 2)[:120]
FAKE_CONVERSATION = "0" * 32
#: Shared-memory progress slots per worker.
SLOTS = ("sent", "received", "receipts", "errors")
#: Seconds; every connection pings at half of it.
KEEPALIVE = 60


#: The timeline's resolution: the worst latency is kept per this much of the schedule.
WINDOW_NS = 100_000_000


def raw_downlink(message_id: str, sender: str, seq: int) -> bytes:
    """The shape and size of the downlink the bridge would publish: what the raw modes
    (no bridge) send, so the broker alone relays the same bytes as with mqchat."""
    return json.dumps(
        {
            "id": message_id,
            "conversation": FAKE_CONVERSATION,
            "seq": seq,
            "from": sender,
            "body": BODY,
            "sent_at": "2026-01-01T00:00:00.000000Z",
        }
    ).encode()


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


def percentiles(histogram: HdrHistogram) -> dict[str, float | int]:
    """p50, p99, p99.9 and max in milliseconds of a histogram of microseconds."""
    if histogram.get_total_count() == 0:
        return {"count": 0}
    return {
        "count": histogram.get_total_count(),
        "p50_ms": histogram.get_value_at_percentile(50) / 1000,
        "p99_ms": histogram.get_value_at_percentile(99) / 1000,
        "p999_ms": histogram.get_value_at_percentile(99.9) / 1000,
        "max_ms": histogram.get_max_value() / 1000,
    }


@dataclass
class Tally:
    """What either generator (1:1 here, groups in ``bench._group_gen``) counts of the
    ``total`` messages of the step ``tag``, beside what each counts its own way."""

    tag: str
    total: int
    _: KW_ONLY
    sent: int = 0
    duplicates: int = 0
    stale: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    max_send_lag_us: int = 0

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


@dataclass
class StepCounts(Tally):
    """What one worker saw of one step."""

    received: bytearray = field(default_factory=bytearray)
    receipted: bytearray = field(default_factory=bytearray)
    received_count: int = 0
    receipt_count: int = 0
    receipt_duplicates: int = 0
    e2e: HdrHistogram = field(default_factory=new_histogram)
    sent_receipt: HdrHistogram = field(default_factory=new_histogram)
    puback: HdrHistogram = field(default_factory=new_histogram)
    #: The worst e2e latency (us) of the messages due in each ``WINDOW_NS`` of the step,
    #: by intended send time: when in the step a stall happened, not only that it did.
    worst_by_window: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.received = bytearray(self.total)
        self.receipted = bytearray(self.total)


async def send_on_schedule(
    tally: Tally, t0: int, interval_ns: int, publish: Callable[[int, int], None]
) -> None:
    """Publish message k at t0 + k * interval, catching up (never skipping) when late.

    ``publish(k, intended)`` sends message ``k``, due at ``intended`` (monotonic ns).
    """
    k = 0
    while k < tally.total:
        due = min(tally.total, (time.monotonic_ns() - t0) // interval_ns + 1)
        while k < due:
            intended = t0 + k * interval_ns
            lag = (time.monotonic_ns() - intended) // 1000
            tally.max_send_lag_us = max(tally.max_send_lag_us, lag)
            publish(k, intended)
            tally.sent += 1
            k += 1
        if k < tally.total:
            await asyncio.sleep(max(0.0, (t0 + k * interval_ns - time.monotonic_ns()) / 1e9))


class Worker:
    def __init__(
        self,
        index: int,
        host: str,
        port: int,
        users: list[str],
        password: str,
        progress: Any,
    ) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.users = users
        self.password = password
        self.progress = progress
        #: One lean MQTT connection per user (``bench._conn_client.Device``): with paho
        #: the generator spent as much CPU per chat message as the bridge, on the same
        #: two cores.
        self.links: dict[str, Device] = {}
        self._pinger: asyncio.Task[None] | None = None
        self.step: StepCounts | None = None
        #: The flooder's step, counted apart from everyone else's.
        self.flood: StepCounts | None = None
        self.t0 = 0
        self.interval_ns = 1
        self.flood_t0 = 0
        self.flood_interval_ns = 1
        self.arrivals = 0  # every downlink message or receipt, any step
        self.echoes = 0  # copies of their own messages sent back to senders
        self.mode = "chat"
        #: Set once every message sent in the step (and its receipt) has arrived.
        self.step_complete = asyncio.Event()

    def commands(self) -> dict[str, Command]:
        """What the main process may ask of this worker (see :func:`serve`), by ``op``."""
        return {"connect": self._connect, "step": self._step, "quiesce": self._quiesce}

    async def _connect(self, command: dict[str, Any]) -> dict[str, Any]:
        seconds = await self.connect_all()
        return {"seconds": seconds, "connected": len(self.links)}

    async def _step(self, command: dict[str, Any]) -> dict[str, Any]:
        return await self.run_step(command["spec"])

    async def _quiesce(self, command: dict[str, Any]) -> dict[str, Any]:
        return await self.quiesce(command["quiet"], command["limit"])

    # -- connections ------------------------------------------------------------------

    async def connect_all(self, concurrency: int = 32) -> float:
        gate = asyncio.Semaphore(concurrency)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()

        async def one(user: str) -> None:
            async with gate:
                # CONNACK 3 ("try later": the broker admits so many sign-ins a second)
                # is answered as a device would: again a second later, for up to two minutes.
                for attempt in range(120):
                    device = Device(on_publish=self._on_message_for(user))
                    await loop.create_connection(lambda d=device: d, self.host, self.port)  # type: ignore[misc]
                    connack = device.expect(CONNACK)
                    device.send(
                        packets.connect(f"{user}:bench", user, self.password, keepalive=KEEPALIVE)
                    )
                    code = (await asyncio.wait_for(connack, 60))[1]
                    if code != 3 or attempt == 119:
                        break
                    if device.transport is not None:
                        device.transport.close()
                    await asyncio.sleep(1)
                if code != 0:
                    raise ConnectionRefusedError(f"{user}: CONNACK {code}")
                suback = device.subscribe([(topics.down_all(user), 1)])
                if 0x80 in (await asyncio.wait_for(suback, 60))[2:]:
                    raise PermissionError(f"{user}: subscription to its down/# refused")
                self.links[user] = device

        await asyncio.gather(*(one(u) for u in self.users))
        self._pinger = asyncio.create_task(self._ping())
        return time.perf_counter() - started

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE / 2)
            for device in self.links.values():
                device.send(PINGREQ_BYTES)

    async def close_all(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        for device in self.links.values():
            device.send(DISCONNECT_BYTES)
            if device.transport is not None:
                device.transport.close()

    # -- receiving --------------------------------------------------------------------

    def _on_message_for(self, user: str) -> Callable[[str, bytes], None]:
        def on_message(topic: str, raw: bytes) -> None:
            now = time.monotonic_ns()
            self.arrivals += 1
            try:
                payload = json.loads(raw)
            except ValueError:
                return
            self._received(user, topic.rsplit("/", 1)[-1], payload, now)

        return on_message

    def _received(self, user: str, kind: str, payload: dict[str, Any], now: int) -> None:
        """One downlink of ``kind`` (``msg``, ``receipt``, ...) for ``user``, decoded."""
        if kind == "msg":
            # mqchat sends every member a copy, the sender's other devices included;
            # only the recipient's copy is the delivery being measured.
            if payload.get("from") == user:
                self.echoes += 1
            else:
                self._count(payload.get("id", ""), now, receipt=False)
        elif kind == "receipt" and payload.get("status") == "sent":
            self._count(payload.get("id", ""), now, receipt=True)
        elif kind == "error":
            code = str(payload.get("code"))
            tag, _, _ = str(payload.get("id", "")).partition(".")
            for counts in (self.step, self.flood):
                if counts is not None and counts.tag == tag:
                    counts.count_error(code)

    def _count(self, message_id: str, now: int, *, receipt: bool) -> None:
        tag, _, number = message_id.partition(".")
        if self.step is not None and tag == self.step.tag:
            counts, t0, interval = self.step, self.t0, self.interval_ns
        elif self.flood is not None and tag == self.flood.tag:
            counts, t0, interval = self.flood, self.flood_t0, self.flood_interval_ns
        else:
            if self.step is not None:
                self.step.stale += 1
            return
        k = int(number)
        if not 0 <= k < counts.total:
            return
        latency_us = max(1, (now - (t0 + k * interval)) // 1000)
        if receipt:
            if counts.receipted[k]:
                counts.receipt_duplicates += 1
                return
            counts.receipted[k] = 1
            counts.receipt_count += 1
            counts.sent_receipt.record_value(min(latency_us, HIST_MAX_US))
        else:
            if counts.received[k]:
                counts.duplicates += 1
                return
            counts.received[k] = 1
            counts.received_count += 1
            counts.e2e.record_value(min(latency_us, HIST_MAX_US))
            window = k * interval // WINDOW_NS
            worst = counts.worst_by_window
            if window >= len(worst):
                worst.extend([0] * (window + 1 - len(worst)))
            if latency_us > worst[window]:
                worst[window] = latency_us
        if counts is self.step and self._complete(counts, self.mode):
            self.step_complete.set()

    # -- sending ----------------------------------------------------------------------

    def _payload(self, mode: str, message_id: str, sender: str, recipient: str, k: int) -> bytes:
        if mode == "chat":
            return json.dumps({"id": message_id, "to": recipient, "body": BODY}).encode()
        return raw_downlink(message_id, sender, k + 1)

    def _topic(self, mode: str, sender: str, recipient: str) -> str:
        return topics.up_msg(sender) if mode == "chat" else topics.down_msg(recipient)

    async def _send_schedule(
        self,
        counts: StepCounts,
        t0: int,
        interval_ns: int,
        mode: str,
        pairs: list[tuple[str, str]],
        *,
        alternate: bool = True,
    ) -> None:
        """The step's messages over ``pairs`` on the open-loop schedule.

        ``alternate``: the two users of a pair take turns sending; False: the first
        sends everything (the flooder).
        """

        def publish(k: int, intended: int) -> None:
            sender, recipient = pairs[k % len(pairs)]
            if alternate and (k // len(pairs)) % 2:
                sender, recipient = recipient, sender
            future = self.links[sender].publish(
                self._topic(mode, sender, recipient),
                self._payload(mode, f"{counts.tag}.{k}", sender, recipient, k),
            )
            future.add_done_callback(self._puback_recorder(counts, intended))

        await send_on_schedule(counts, t0, interval_ns, publish)

    @staticmethod
    def _puback_recorder(counts: StepCounts, intended: int) -> Callable[[Any], None]:
        def done(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                latency_us = max(1, (time.monotonic_ns() - intended) // 1000)
                counts.puback.record_value(min(latency_us, HIST_MAX_US))

        return done

    async def run_step(self, spec: dict[str, Any]) -> dict[str, Any]:
        # No garbage collection during a step: a full collection over 500 clients'
        # objects stalled the schedule by ~100 ms, and that stall would be charged to
        # mqchat (open loop). The step's garbage is collected after it.
        gc.collect()
        gc.disable()
        try:
            return await self._run_step(spec)
        finally:
            gc.enable()

    async def _run_step(self, spec: dict[str, Any]) -> dict[str, Any]:
        mode: str = spec["mode"]
        pairs = [tuple(p) for p in spec["pairs"]]
        rate: float = spec["rate"]
        duration: float = spec["duration"]
        drain: float = spec["drain"]
        start_at_wall: float = spec["start_at"]
        total = int(rate * duration) if pairs else 0
        counts = StepCounts(spec["tag"], total)
        flood_spec = spec.get("flood")
        flood = None
        if flood_spec is not None:
            flood = StepCounts(spec["tag"] + "f", int(flood_spec["rate"] * duration))

        # All workers start together: the main process hands out a wall-clock start.
        await asyncio.sleep(max(0.0, start_at_wall - time.time()))
        cpu_before = os.times()
        wall_before = time.monotonic()
        self.t0 = time.monotonic_ns() + int(spec.get("offset", 0.0) * 1e9)
        t0_wall = time.time() + (self.t0 - time.monotonic_ns()) / 1e9
        self.interval_ns = max(1, int(1e9 / rate)) if rate > 0 else 1
        self.step, self.flood, self.mode = counts, flood, mode
        self.step_complete.clear()
        senders = [self._send_schedule(counts, self.t0, self.interval_ns, mode, pairs)]
        if flood is not None and flood_spec is not None:
            self.flood_t0 = self.t0
            self.flood_interval_ns = max(1, int(1e9 / flood_spec["rate"]))
            flood_pair = [tuple(flood_spec["pair"])]
            senders.append(
                self._send_schedule(
                    flood, self.flood_t0, self.flood_interval_ns, mode, flood_pair, alternate=False
                )
            )
        reporter = asyncio.create_task(self._report(counts))
        try:
            await asyncio.gather(*senders)
            send_seconds = time.monotonic() - wall_before
            if not self._complete(counts, mode):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.step_complete.wait(), drain)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            self._publish_progress(counts)
        cpu_after = os.times()
        wall = time.monotonic() - wall_before
        result = self._summary(counts, mode)
        result.update(
            send_seconds=send_seconds,
            wall_seconds=wall,
            cpu_seconds=(cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system),
            t0_wall=t0_wall,
            worst_by_window_us=counts.worst_by_window,
        )
        if flood is not None and flood_spec is not None:
            result["flood"] = self._summary(flood, mode)
            # Whether the broker cut the flooder off (its publish quota); it does not
            # reconnect, so what it still "sends" after that goes nowhere.
            result["flood"]["cut_off"] = self.links[flood_spec["pair"][0]].closed
        return result

    @staticmethod
    def _complete(counts: StepCounts, mode: str) -> bool:
        if counts.sent < counts.total or counts.received_count < counts.sent:
            return False
        return mode != "chat" or counts.receipt_count >= counts.sent

    @staticmethod
    def _summary(counts: StepCounts, mode: str) -> dict[str, Any]:
        received, receipts = counts.received_count, counts.receipt_count
        return {
            "scheduled": counts.total,
            "sent": counts.sent,
            "received": received,
            "lost": counts.sent - received,
            "duplicates": counts.duplicates,
            "receipts": receipts if mode == "chat" else None,
            "receipts_missing": counts.sent - receipts if mode == "chat" else None,
            "receipt_duplicates": counts.receipt_duplicates,
            "stale": counts.stale,
            "errors": counts.errors,
            "max_send_lag_ms": counts.max_send_lag_us / 1000,
            "e2e": counts.e2e.encode().decode(),
            "sent_receipt": counts.sent_receipt.encode().decode(),
            "puback": counts.puback.encode().decode(),
        }

    def _publish_progress(self, counts: StepCounts) -> None:
        base = self.index * len(SLOTS)
        self.progress[base + 0] = counts.sent
        self.progress[base + 1] = counts.received_count
        self.progress[base + 2] = counts.receipt_count
        self.progress[base + 3] = sum(counts.errors.values())

    async def _report(self, counts: StepCounts) -> None:
        while True:
            self._publish_progress(counts)
            await asyncio.sleep(0.25)

    async def quiesce(self, quiet: float, limit: float) -> dict[str, Any]:
        """Wait until nothing has arrived for ``quiet`` seconds (at most ``limit``)."""
        self.step = self.flood = None
        started = time.monotonic()
        last_count, last_change = self.arrivals, time.monotonic()
        while time.monotonic() - started < limit:
            await asyncio.sleep(0.1)
            if self.arrivals != last_count:
                last_count, last_change = self.arrivals, time.monotonic()
            elif time.monotonic() - last_change >= quiet:
                break
        return {"arrivals": self.arrivals, "seconds": time.monotonic() - started}


async def serve(conn: Connection, worker: Worker) -> None:
    """A generator process's loop: the main process's commands, one at a time, each
    answered with ``{"ok": True, ...}`` or the error, until ``stop``."""
    loop = asyncio.get_running_loop()
    handlers = worker.commands()
    while True:
        command: dict[str, Any] = await loop.run_in_executor(None, conn.recv)
        try:
            if command["op"] == "stop":
                await worker.close_all()
                conn.send({"ok": True})
                return
            conn.send({"ok": True, **await handlers[command["op"]](command)})
        except Exception as exc:  # report to the main process instead of dying silently
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def worker_main(conn: Connection, make_worker: Callable[[], Worker]) -> None:
    """Entry point of a generator process: the worker is built here, in the process
    whose event loop its connections will belong to."""
    asyncio.run(serve(conn, make_worker()))


def spawn(name: str, make_worker: Callable[[], Worker]) -> tuple[BaseProcess, Connection]:
    """Start a generator process serving ``make_worker()`` (a ``functools.partial`` of
    a Worker class: it is pickled to the fresh interpreter); the main process's end of
    its pipe."""
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    process = context.Process(
        target=worker_main, args=(theirs, make_worker), name=name, daemon=True
    )
    process.start()
    return process, mine


def join_or_kill(processes: list[BaseProcess]) -> None:
    """Wait for generator processes told to stop; kill any still running after 10 s."""
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
