"""Latency of one history page on a conversation of a million messages (PostgreSQL).

    .venv/bin/python -m bench.history_page                   # python -m history_api, loopback HTTP
    .venv/bin/python -m bench.history_page --transport asgi  # the app in-process (httpx ASGI)

Starts a throwaway PostgreSQL (``tests.support.services.start_postgres``) unless
``--database-url`` names an empty database, migrates it, creates two accounts and
their conversation through the store, then COPYs the rest of the messages in (with
every index of the schema in place, as in production). It then asks the real app for
``GET /v1/conversations/{id}/messages?before=<random seq>&limit=50`` with a bearer
token from ``POST /v1/tokens``, one request at a time, and prints percentiles.

Bounded: at most ``--requests`` requests and ``--max-seconds`` of measuring. Every
server it starts listens on loopback only and is stopped at the end. Percentiles are
nearest-rank over the sorted latencies (no histogram library needed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlmodel import Session

from bench._report import git_commit
from history_api import ApiSettings, create_app
from protocol import UpMessage
from store import accounts, history, make_engine, migrate
from store.messages import persist_batch

ROOT = Path(__file__).resolve().parents[1]
SENDER, RECIPIENT = "alice", "bob"
PASSWORD = "bench-password"  # noqa: S105 (a throwaway account)
T0 = datetime(2025, 1, 1, tzinfo=UTC)
PAGE = 50


@dataclass(frozen=True)
class Percentiles:
    count: int
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    seconds: float

    @classmethod
    def of(cls, latencies_ms: list[float], seconds: float) -> Percentiles:
        ordered = sorted(latencies_ms)

        def rank(p: float) -> float:
            return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

        return cls(len(ordered), rank(50), rank(90), rank(99), rank(99.9), ordered[-1], seconds)

    def line(self, label: str) -> str:
        return (
            f"{label}: n={self.count} in {self.seconds:.1f} s ({self.count / self.seconds:.0f}/s)"
            f"  p50 {self.p50:.2f} ms  p90 {self.p90:.2f} ms  p99 {self.p99:.2f} ms"
            f"  p99.9 {self.p999:.2f} ms  max {self.max:.2f} ms"
        )


def log(text: str) -> None:
    print(text, flush=True)


# -- the data ---------------------------------------------------------------------------


def fill(engine: Engine, url: str, total: int, chunk: int) -> str:
    """Two accounts and one conversation of ``total`` messages; returns its id."""
    with Session(engine) as session:
        for name in (SENDER, RECIPIENT):
            accounts.create(session, name, PASSWORD)
        session.commit()
    # The first message through the real write path creates the conversation.
    (outcome,) = persist_batch(
        engine, [(SENDER, UpMessage(id="m0000001", to=RECIPIENT, body="hi"))]
    )
    assert outcome.stored is not None
    conversation = outcome.stored.conversation

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    started = time.perf_counter()
    with psycopg.connect(conninfo) as conn:
        seq = 1
        while seq < total:
            upto = min(total, seq + chunk)
            with (
                conn.cursor() as cursor,
                cursor.copy(
                    "COPY messages (conversation_id, seq, sender, client_id, body, sent_at)"
                    " FROM STDIN"
                ) as copy,
            ):
                for n in range(seq + 1, upto + 1):
                    copy.write_row(
                        (
                            conversation,
                            n,
                            SENDER if n % 2 else RECIPIENT,
                            f"m{n:07}",
                            f"message {n}: see you at the harbour around {n % 24}h, bring the maps",
                            T0 + timedelta(milliseconds=n),
                        )
                    )
            conn.commit()
            seq = upto
            elapsed = time.perf_counter() - started
            log(
                f"  filled {seq:>9,}/{total:,} messages"
                f"  {seq / elapsed:>8,.0f} msg/s  {elapsed:6.1f} s"
            )
        conn.execute("UPDATE conversations SET last_seq = %s WHERE id = %s", (total, conversation))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return conversation


# -- the clients ------------------------------------------------------------------------

#: GET a target (path and query) with headers; the status and the body.
Fetch = Callable[[str, dict[str, str]], Awaitable[tuple[int, bytes]]]


@dataclass
class Api:
    """Where the app is: httpx for the one-off calls, ``fetch`` for the measured ones."""

    client: httpx.AsyncClient
    fetch: Fetch


@contextlib.asynccontextmanager
async def asgi_api(url: str) -> AsyncIterator[Api]:
    """The app in this process, through httpx's ASGI transport (no sockets, no HTTP parsing)."""
    app = create_app(ApiSettings(database_url=url))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c,
    ):

        async def fetch(target: str, headers: dict[str, str]) -> tuple[int, bytes]:
            response = await c.get(target, headers=headers)
            return response.status_code, response.content

        yield Api(c, fetch)


class KeepAliveConnection:
    """A minimal HTTP/1.1 client on one kept-alive socket.

    httpx spends about half a millisecond of Python per request building and parsing;
    on a 2-core machine shared with the server and PostgreSQL that would be counted as
    server latency. This sends a GET and reads a Content-Length body, nothing more.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def fetch(self, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"GET {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def http_api(url: str, log_dir: Path) -> AsyncIterator[Api]:
    """``python -m history_api`` (uvicorn) in its own process, on loopback."""
    from tests.support.stack import api_daemon, api_url

    server = api_daemon(log_dir, url)
    await asyncio.to_thread(server.start_ready)
    host, port = server.ports[0]
    connection = KeepAliveConnection(host, port)
    try:
        async with httpx.AsyncClient(base_url=api_url(server)) as client:
            yield Api(client, connection.fetch)
    finally:
        await connection.close()
        server.stop()


async def measure(
    api: Api,
    conversation: str,
    total: int,
    *,
    requests: int,
    warmup: int,
    max_seconds: float,
    rng: random.Random,
) -> Percentiles:
    response = await api.client.post(
        "/v1/tokens", data={"username": RECIPIENT, "password": PASSWORD}
    )
    response.raise_for_status()
    headers = {"Authorization": f"Bearer {response.json()['access_token']}"}
    path = f"/v1/conversations/{conversation}/messages"

    async def one() -> float:
        before = rng.randint(PAGE + 1, total + 1)
        target = f"{path}?before={before}&limit={PAGE}"
        started = time.perf_counter_ns()
        status, body = await api.fetch(target, headers)
        elapsed = (time.perf_counter_ns() - started) / 1e6
        if status != 200:
            raise RuntimeError(f"{status}: {body[:500]!r}")
        page = json.loads(body)["messages"]
        if len(page) != PAGE or page[-1]["seq"] != before - 1:
            raise RuntimeError(f"wrong page for before={before}")
        return elapsed

    for _ in range(warmup):
        await one()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < requests and time.perf_counter() - started < max_seconds:
        latencies.append(await one())
    return Percentiles.of(latencies, time.perf_counter() - started)


def measure_store(
    engine: Engine, conversation: str, total: int, *, requests: int, rng: random.Random
) -> Percentiles:
    """The same page straight from store.history: what the database part costs."""
    latencies: list[float] = []
    started = time.perf_counter()
    for _ in range(requests):
        before = rng.randint(PAGE + 1, total + 1)
        begin = time.perf_counter_ns()
        with Session(engine) as session:
            found = history.page(session, RECIPIENT, conversation, before=before, limit=PAGE)
        latencies.append((time.perf_counter_ns() - begin) / 1e6)
        if found is None or len(found.messages) != PAGE:
            raise RuntimeError(f"wrong page for before={before}")
    return Percentiles.of(latencies, time.perf_counter() - started)


# -- the run ----------------------------------------------------------------------------


def machine() -> str:
    memory_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{memory_kib / 1024 / 1024:.1f} GiB RAM, Python {platform.python_version()}, "
        f"commit {git_commit()}"
    )


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from tests.support.services import start_postgres

    with tempfile.TemporaryDirectory(prefix="mqchat-bench-") as tmp:
        server = start_postgres(Path(tmp))
        try:
            server.create_database("bench")
            yield server.url("bench")
        finally:
            server.close()


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    log(f"machine: {machine()}")
    with database(args.database_url) as url:
        engine = make_engine(url)
        try:
            migrate(engine)
            log(
                f"filling one conversation with {args.messages:,} messages"
                f" (COPY, chunks of {args.chunk:,})"
            )
            conversation = fill(engine, url, args.messages, args.chunk)
            with engine.connect() as conn:
                version = conn.exec_driver_sql("SHOW server_version").scalar_one()
            log(f"PostgreSQL {version}; conversation {conversation}")

            store_only = measure_store(
                engine, conversation, args.messages, requests=min(args.requests, 2000), rng=rng
            )
            log(store_only.line("store.history.page alone"))

            with tempfile.TemporaryDirectory(prefix="mqchat-bench-api-") as tmp:
                if args.transport == "asgi":
                    api_context = asgi_api(url)
                else:
                    api_context = http_api(url, Path(tmp))
                async with api_context as api:
                    result = await measure(
                        api,
                        conversation,
                        args.messages,
                        requests=args.requests,
                        warmup=args.warmup,
                        max_seconds=args.max_seconds,
                        rng=rng,
                    )
            log(result.line(f"GET .../messages?before=&limit={PAGE} ({args.transport})"))
            verdict = "met" if result.p99 < args.target_p99_ms else "MISSED"
            log(f"target p99 < {args.target_p99_ms} ms: {verdict}")
        finally:
            engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=100_000, help="rows per COPY transaction")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--transport", choices=["asgi", "http"], default="http")
    parser.add_argument("--database-url", help="an empty PostgreSQL database (default: start one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target-p99-ms", type=float, default=10.0)
    args = parser.parse_args()
    if args.messages < PAGE + 1:
        parser.error(f"--messages must be over {PAGE}")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
