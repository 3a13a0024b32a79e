"""Client misbehaviour costs the embedded broker's log one line per kind, never a traceback.

Before, amqtt wrote a "Timeout waiting for PUBACK" warning and a "Task failed" ERROR
with a traceback for every QoS 1 message a client never acknowledged, and the gate a
line for every refused connection: an attacker decided how fast the log grew
(a connection flood produced 3,458 tracebacks in one second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from broker.lognoise import CLIENT_LOG, ClientNoiseFilter

from .support.clients import BRIDGE, connect_actor, probe
from .support.packets import connect, subscribe
from .support.raw import Raw, dial, login
from .support.services import Daemon, wait_until
from .support.stack import Stack, password_of

NON_ACKERS = 20
QUEUED = 10
FLOOD = 200

# -- the filter alone ---------------------------------------------------------------------


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(
    name: str, msg: str, exc: BaseException | None = None, line: int = 1
) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, logging.WARNING, "x.py", line, msg, None, exc_info)


def test_one_record_per_kind_and_interval_then_a_count() -> None:
    clock = Clock()
    noise = ClientNoiseFilter(10.0, clock)
    passed = [noise.filter(_record("amqtt.broker", f"client {i} timed out")) for i in range(100)]
    assert passed == [True] + [False] * 99
    assert noise.filter(_record(CLIENT_LOG, "another kind"))  # its own count
    assert noise.filter(_record("amqtt.broker", "same text, other line", line=2))
    clock.now += 10
    later = _record("amqtt.broker", "client 100 timed out")
    assert noise.filter(later)
    assert later.getMessage() == "client 100 timed out [and 99 more like this not logged]"
    # Other loggers are not the clients' to fill: untouched.
    assert all(noise.filter(_record("broker.embedded", "dropped")) for _ in range(5))


def test_client_caused_tracebacks_become_one_line_others_stay() -> None:
    noise = ClientNoiseFilter(0.0)
    timeout = _record("amqtt.broker", "Task failed", TimeoutError("no PUBACK for 7"))
    assert noise.filter(timeout)
    assert timeout.exc_info is None
    assert timeout.getMessage() == "Task failed: TimeoutError: no PUBACK for 7"
    bug = _record("amqtt.broker", "Task failed", KeyError("ours"), line=3)
    assert noise.filter(bug)
    assert bug.exc_info is not None


# -- the broker -------------------------------------------------------------------------------


@pytest.fixture
def embedded_broker_env() -> dict[str, str]:
    return {"MQCHAT_BROKER_CLIENT_LOG_INTERVAL": "1"}


def _accounted(log: str, needle: str) -> int:
    """How many events of a kind the log accounts for: its lines plus those left out."""
    lines = [line for line in log.splitlines() if needle in line]
    left_out = [re.search(r"\[and (\d+) more like this", line) for line in lines]
    return len(lines) + sum(int(m.group(1)) for m in left_out if m)


async def one_more_until_accounted(
    broker: Daemon,
    needle: str,
    one_more: Callable[[int], Awaitable[None]],
    before: int,
    what: str,
    timeout: float,
) -> int:
    """Cause one more event at a time (``one_more(1)``, ``one_more(2)``, ..., at most
    five), each after waiting up to ``timeout`` for the log to account for ``before``
    and those so far: a later event's line brings the count of those left out before
    it. Returns the count last waited for."""
    for more in range(1, 6):
        await one_more(more)
        expected = before + more
        with contextlib.suppress(TimeoutError):
            await asyncio.to_thread(
                wait_until,
                lambda: _accounted(broker.log_text(), needle) >= expected,  # noqa: B023
                timeout=timeout,
                what=f"{expected} {what} accounted for",
            )
            break
    return expected


async def test_clients_that_never_puback_cost_a_bounded_log(embedded: Stack) -> None:
    await embedded.add_users("mallory")
    assert embedded.embedded_broker is not None
    broker = embedded.embedded_broker
    held: list[Raw] = []
    for i in range(NON_ACKERS):  # subscribed at QoS 1, and never a PUBACK
        raw = await dial(embedded, held)
        await raw.send(login("mallory", f"mallory:noack-{i}"))
        assert await raw.answer() == "CONNACK 0"
        await raw.send(subscribe([b"chat/v1/u/mallory/down/msg"], qos=1))
        assert await raw.answer() == "SUBACK"
    bridge = await connect_actor(embedded, BRIDGE, "sender")
    await bridge.link.publish("chat/v1/u/mallory/down/msg", probe("first"), qos=1)
    needle = "Timeout waiting for PUBACK"

    # amqtt gives up after 5 s on each of them; once the first line is out, one more
    # unacknowledged message, over a second later, brings the count of those left out.
    await asyncio.to_thread(
        wait_until, lambda: needle in broker.log_text(), timeout=30, what=needle
    )
    await bridge.link.publish("chat/v1/u/mallory/down/msg", probe("second"), qos=1)
    expected = NON_ACKERS + 1  # all of the first round, and the line of the second
    await asyncio.to_thread(
        wait_until,
        lambda: _accounted(broker.log_text(), needle) >= expected,
        timeout=30,
        what=f"{expected} PUBACK timeouts accounted for",
    )
    log = broker.log_text()
    for raw in held:
        raw.close()
    assert len([line for line in log.splitlines() if needle in line]) <= 4, log[-3000:]
    assert "Traceback" not in log


async def test_queued_and_retained_messages_never_acknowledged_cost_no_traceback(
    embedded: Stack,
) -> None:
    """The paths the gate added for queued (reconnecting) and retained (subscribing)
    messages: before, each message not acknowledged left asyncio's "Task exception was
    never retrieved" ERROR with a traceback, outside the rate limit."""
    await embedded.add_users("mallory")
    assert embedded.embedded_broker is not None
    broker = embedded.embedded_broker
    bridge = await connect_actor(embedded, BRIDGE, "sender")
    persistent = connect(b"mallory:queue", b"mallory", password_of("mallory").encode(), clean=False)
    held: list[Raw] = []
    away = await dial(embedded, held)
    await away.send(persistent)
    assert await away.answer() == "CONNACK 0"
    await away.send(subscribe([b"chat/v1/u/mallory/down/msg"], qos=1))
    assert await away.answer() == "SUBACK"
    away.close()
    for i in range(QUEUED):
        await bridge.link.publish("chat/v1/u/mallory/down/msg", probe(f"queued {i}"), qos=1)
        topic = f"chat/v1/u/mallory/down/presence/{i}"
        await bridge.link.publish(topic, probe("state"), 1, retain=True)
    back = await dial(embedded, held)  # takes the queue, acknowledges nothing
    await back.send(persistent)
    await back.send(subscribe([b"chat/v1/u/mallory/down/presence/+"], qos=1))  # retained
    needle = "Timeout waiting for PUBACK"
    await asyncio.to_thread(
        wait_until, lambda: needle in broker.log_text(), timeout=30, what=needle
    )
    # The queued ones time out first (amqtt sends them before it reads the SUBSCRIBE),
    # the retained ones 5 s later; then one more live message at a time.

    async def live(n: int) -> None:
        await bridge.link.publish("chat/v1/u/mallory/down/msg", probe(f"live {n}"), qos=1)

    expected = await one_more_until_accounted(
        broker, needle, live, 2 * QUEUED, "PUBACK timeouts", timeout=7
    )
    assert _accounted(broker.log_text(), needle) >= expected
    for raw in held:
        raw.close()
    log = broker.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert "never retrieved" not in log


async def test_a_connection_flood_costs_a_bounded_log(embedded: Stack) -> None:
    assert embedded.embedded_broker is not None
    held: list[Raw] = []

    async def refused() -> str:
        raw = await dial(embedded, held)
        await raw.send(b"GET / HTTP/1.1\r\n\r\n")  # not MQTT
        return await raw.until_closed(timeout=10)

    assert set(await asyncio.gather(*(refused() for _ in range(FLOOD)))) == {"closed"}
    for raw in held:
        raw.close()
    log = embedded.embedded_broker.log_text()
    refusals = [line for line in log.splitlines() if "refused" in line]
    assert len(refusals) <= 10, f"{len(refusals)} lines for {FLOOD} connections"
    assert "Traceback" not in log


async def test_websocket_handshakes_without_mqtt_cost_a_bounded_log(embedded: Stack) -> None:
    """No ``mqtt`` subprotocol, a wrong one, or no upgrade at all: before, each was an
    ERROR with a traceback from the websockets server (the gate never sees them)."""
    assert embedded.embedded_broker is not None
    broker = embedded.embedded_broker
    url = f"ws://127.0.0.1:{broker.env['MQCHAT_BROKER_WS_PORT']}/mqtt"

    async def handshake(subprotocols: list[Subprotocol] | None) -> str:
        try:
            async with websockets.connect(url, subprotocols=subprotocols, open_timeout=10):
                return "open"
        except InvalidStatus as refused:
            return str(refused.response.status_code)

    outcomes = await asyncio.gather(
        *(handshake(None) for _ in range(FLOOD // 4)),
        *(handshake([Subprotocol("bogus")]) for _ in range(FLOOD // 4)),
    )
    assert set(outcomes) == {"400"}
    needle = "handshake failed"

    async def late(_: int) -> None:
        assert await handshake(None) == "400"

    expected = await one_more_until_accounted(
        broker, needle, late, FLOOD // 2, "failed handshakes", timeout=2
    )
    log = broker.log_text()
    assert _accounted(log, needle) >= expected
    failures = [line for line in log.splitlines() if needle in line]
    assert len(failures) <= 8, f"{len(failures)} lines for {expected} handshakes"
    assert "Traceback" not in log
