"""Sign-in bursts: do correct sign-ins slow down everyone else?

    python -m bench.signin_burst                 # embedded stack (amqtt + SQLite) + API

Each password check is an argon2 hash of 64 MiB. Before ``store.signin`` bounded
them, 40 threads signing in with the right password took the API from 95 to 1,662 MiB
and other users' ``GET /v1/conversations`` to p50 2.3 s; 50 MQTT CONNECTs took the
embedded broker to 500 MB and stalled chat for 5 s.

One run, on one stack, two steps of the same open-loop chat (``bench.load``'s
generator, its users already connected):

1. unloaded: the chat, and one user reading ``GET /v1/conversations`` in a closed loop;
2. burst: the same, while ``clients`` other users each sign in over and over as fast
   as they are answered, half with an MQTT CONNECT to the broker (then DISCONNECT),
   half with ``POST /v1/tokens`` to the API; refused, they wait as they are told,
   with jitter (``Retry-After`` times 1-1.5; 0.5-1.5 s after CONNACK 3, or after
   mosquitto closes a throttled CONNECT before its CONNACK) and go on.

The burst's clients and the reader each run in a process of their own, as other
people's devices and apps would: the reader does not share an event loop with them.

Reported: the chat's p99 and the API reader's p50/p99 in each step, their ratios
(burst / unloaded, measured in the same run), the sign-ins answered and refused, and
the broker's and API's peak resident memory. Bounded: every step lasts ``seconds``
plus the chat's drain; the burst stops with its step.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import shlex
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from bench._conn_client import Device, HandshakeError
from bench._gen import new_histogram, percentiles
from bench._stack import PASSWORD, log
from bench.load import RESULTS, Run, Settings, StepPlan, generated_load
from tests.support import packets
from tests.support.packets import CONNACK, DISCONNECT_BYTES
from tests.support.stack import api_daemon, api_url

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


#: ``BurstCounts.mqtt_refused``'s key for a connection closed before its CONNACK.
REFUSED_BY_CLOSING = -1


@dataclass
class BurstCounts:
    mqtt_accepted: int = 0
    mqtt_refused: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    failures: int = 0


async def _mqtt_sign_ins(
    host: str, port: int, user: str, until: float, counts: BurstCounts
) -> None:
    loop = asyncio.get_running_loop()
    while time.monotonic() < until:
        device = Device()
        try:
            await loop.create_connection(lambda d=device: d, host, port)  # type: ignore[misc]
            connack = device.expect(CONNACK)
            device.send(packets.connect(f"{user}:burst", user, PASSWORD, keepalive=30))
            code = (await asyncio.wait_for(connack, 30))[1]
        except HandshakeError as exc:
            if exc.kind != "closed_by_broker":
                raise
            # mosquitto's plugin refuses a throttled CONNECT by closing the connection
            # before its CONNACK (it cannot send CONNACK 3): "try later", as below.
            code = REFUSED_BY_CLOSING
        except (OSError, TimeoutError):
            counts.failures += 1
            await asyncio.sleep(0.05)
            continue
        if code == 0:
            counts.mqtt_accepted += 1
            device.send(DISCONNECT_BYTES)
        if device.transport is not None:
            device.transport.close()
        if code != 0:
            # CONNACK 3 means "try later": a client that waits about a second, with
            # jitter as the SDK's backoff has (the HTTP clients wait their
            # Retry-After). Exactly one second made the refused clients one herd,
            # back every 1.1 s: a stall of its own in the chat's latency timeline.
            counts.mqtt_refused[code] = counts.mqtt_refused.get(code, 0) + 1
            await asyncio.sleep(random.uniform(0.5, 1.5))


async def _token_sign_ins(
    http: httpx.AsyncClient, user: str, until: float, counts: BurstCounts
) -> None:
    while time.monotonic() < until:
        try:
            answer = await http.post("/v1/tokens", data={"username": user, "password": PASSWORD})
        except httpx.HTTPError:
            counts.failures += 1
            await asyncio.sleep(0.05)
            continue
        counts.tokens[answer.status_code] = counts.tokens.get(answer.status_code, 0) + 1
        if answer.status_code == 429:
            # At least Retry-After, plus jitter, as for CONNACK 3 above: the 20 users'
            # allowances refill in step, so exact waits brought them back as one herd
            # every 1.1 s, and the herd was most of the API reader's p99.
            wait = float(answer.headers.get("Retry-After", "1"))
            await asyncio.sleep(wait * random.uniform(1, 1.5))


async def _reader(http: httpx.AsyncClient, token: str, until: float) -> dict[str, Any]:
    """One user reading its conversations in a closed loop; latency per request."""
    histogram = new_histogram()
    statuses: dict[int, int] = {}
    while time.monotonic() < until:
        started = time.perf_counter()
        answer = await http.get("/v1/conversations", headers={"Authorization": f"Bearer {token}"})
        histogram.record_value(max(1, int((time.perf_counter() - started) * 1e6)))
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        await asyncio.sleep(0.02)
    return {"latency": percentiles(histogram), "statuses": statuses}


async def _burst(
    api_url: str, host: str, port: int, users: list[str], seconds: float
) -> BurstCounts:
    counts = BurstCounts()
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=len(users) + 4)
    async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=limits) as http:
        half = len(users) // 2
        burst = [_mqtt_sign_ins(host, port, u, until, counts) for u in users[:half]]
        burst += [_token_sign_ins(http, u, until, counts) for u in users[half:]]
        await asyncio.gather(*burst)
    return counts


async def _read(api_url: str, user: str, seconds: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as http:
        answer = await http.post("/v1/tokens", data={"username": user, "password": PASSWORD})
        answer.raise_for_status()
        return await _reader(http, answer.json()["access_token"], time.monotonic() + seconds)


def burst_process(
    api_url: str, host: str, port: int, users: list[str], seconds: float
) -> BurstCounts:
    """The burst, in a process of its own (see :func:`_side_processes`)."""
    return asyncio.run(_burst(api_url, host, port, users, seconds))


def reader_process(api_url: str, user: str, seconds: float) -> dict[str, Any]:
    """The reader, in a process of its own (see :func:`_side_processes`)."""
    return asyncio.run(_read(api_url, user, seconds))


def _ready() -> bool:
    return True


@contextmanager
def _side_processes() -> Iterator[tuple[ProcessPoolExecutor, ProcessPoolExecutor]]:
    """One process for the burst's clients and one for the reader, started (and their
    imports done) before the first step. The reader is another user's app: sharing an
    event loop, a GIL and an HTTP connection pool with 40 clients signing in over and
    over, it measured the benchmark's own contention as the API's latency."""
    context = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(1, mp_context=context) as burst,
        ProcessPoolExecutor(1, mp_context=context) as reader,
    ):
        burst.submit(_ready).result(60)
        reader.submit(_ready).result(60)
        yield burst, reader


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@app.command()
def main(
    clients: Annotated[int, typer.Option(help="users signing in over and over at once")] = 40,
    seconds: float = 20,
    rate: Annotated[float, typer.Option(help="chat msg/s of the others")] = 50,
    chatting: Annotated[int, typer.Option(help="users chatting (in pairs)")] = 100,
    users: Annotated[int, typer.Option(help="accounts (connected by the generator)")] = 200,
    stack: Annotated[str, typer.Option(help="embedded (amqtt) or production (mosquitto)")] = (
        "embedded"
    ),
    results: Annotated[Path, typer.Option(help="JSON lines are appended here")] = RESULTS,
) -> None:
    """Chat p99 and API latency without and with a burst of correct sign-ins."""
    if chatting + clients + 1 > users:
        raise typer.BadParameter("users must hold the chatting, the readers and the burst")
    run = Run(shlex.join(["python", "-m", "bench.signin_burst", *sys.argv[1:]]), results)
    s = Settings(users, 2, 1, seconds, 10)
    with _side_processes() as (bursts, readers), generated_load(stack, s, users) as gen:
        api = api_daemon(gen.stack.base, gen.stack.database_url)
        api.start_ready()
        try:
            names = gen.stack.users
            reader_user, burst_users = names[chatting], names[chatting + 1 : chatting + 1 + clients]
            pids = gen.stack.pids()
            outcome: dict[str, Any] = {}
            for label, burst in (("without burst", []), ("with burst", burst_users)):
                url, host, port = api_url(api), gen.stack.host, gen.stack.port
                burst_done = bursts.submit(burst_process, url, host, port, burst, seconds)
                read_done = readers.submit(reader_process, url, reader_user, seconds)
                result = gen.run(
                    StepPlan(f"sign-in burst: {label}", "chat", rate, seconds, 10, chatting // 2)
                )
                counts, side = burst_done.result(seconds + 60), read_done.result(seconds + 60)
                result["signin_burst"] = {
                    "clients": len(burst),
                    "mqtt_accepted": counts.mqtt_accepted,
                    "mqtt_refused": counts.mqtt_refused,
                    "tokens": counts.tokens,
                    "failures": counts.failures,
                    "api_reader": side,
                    "peak_rss_mib": {
                        "api": round(_peak_rss_mib(api.pid), 1) if api.pid else None,
                        "broker": [round(_peak_rss_mib(p), 1) for p in pids.get("broker", [])],
                    },
                }
                run.record("signin-burst", gen.stack, 1, result)
                outcome[label] = result
                summary = json.dumps(result["signin_burst"])
                log(f"  {label}: chat p99 {result['e2e'].get('p99_ms')} ms; {summary}")
                gen.quiesce()
        finally:
            api.stop()
    quiet, loud = outcome["without burst"], outcome["with burst"]
    chat_ratio = loud["e2e"]["p99_ms"] / quiet["e2e"]["p99_ms"]
    api_quiet = quiet["signin_burst"]["api_reader"]["latency"]["p99_ms"]
    api_loud = loud["signin_burst"]["api_reader"]["latency"]["p99_ms"]
    log(
        f"sign-in burst ({stack}): chat p99 {quiet['e2e']['p99_ms']:.1f} -> "
        f"{loud['e2e']['p99_ms']:.1f} ms (x{chat_ratio:.2f}); GET /v1/conversations p99 "
        f"{api_quiet:.1f} -> {api_loud:.1f} ms (x{api_loud / api_quiet:.2f})"
    )


if __name__ == "__main__":
    app()
