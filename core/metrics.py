"""What every daemon shows an operator: ``/metrics``, ``/livez`` and ``/readyz``.

::

    Prometheus ──GET /metrics──▶ ┐
    a supervisor ──GET /livez──▶ ├─ MetricsServer (uvicorn, on the daemon's own loop)
    mqchat status ─GET /readyz─▶ ┘        │
                                          ├─ the daemon's CollectorRegistry
                                          └─ its Checks: {"broker": ..., "database": ...}

A daemon builds its metrics on a registry of its own (:func:`new_registry`), not on
prometheus_client's process-wide default: the history API's tests build many apps in
one process, and each must count only its own requests. The registry also carries the
process metrics the library gives (CPU, memory, open files, garbage collections).

The listener runs on the daemon's event loop, not in a thread: ``/livez`` then fails
when the loop is stuck, which is what liveness is for. Readiness runs the daemon's
checks, each bounded by :data:`CHECK_TIMEOUT`, so a probe answers in bounded time even
when the database hangs.

A daemon without a port of its own (bridge, embedded broker, push notifier) serves
these on ``MQCHAT_<DAEMON>_METRICS_ADDR`` (``host:port``); the history API serves them
on its own port (``history_api.observe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Final

import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from store.db import current_revision, head_revision

from .daemon import parse_addr

log = logging.getLogger(__name__)

#: Seconds one readiness check may take before it counts as failed.
CHECK_TIMEOUT: Final = 2.0
#: The paths every daemon answers on (the history API too, on its own port).
METRICS_PATH: Final = "/metrics"
LIVE_PATH: Final = "/livez"
READY_PATH: Final = "/readyz"


class CannotListen(Exception):
    """The metrics address is in use, or not ours to bind (``EXIT_CANNOT_LISTEN``)."""


#: One readiness check: None when it passes, else why not (one line).
Check = Callable[[], Awaitable[str | None]]


def new_registry() -> CollectorRegistry:
    """A daemon's registry, with the process, platform and GC metrics in it."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def database_check(engine: Engine) -> Check:
    """Ready when the database answers and its schema is the one this code needs."""

    def revision() -> str | None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            return current_revision(conn)

    def probe() -> str | None:
        try:
            current = revision()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # A pooled connection from before the database came back: SQLAlchemy
            # has dropped the pool, the next one is new.
            current = revision()
        head = head_revision()
        if current != head:
            return f"schema at {current}, this code needs {head}"
        return None

    async def check() -> str | None:
        return await asyncio.to_thread(probe)

    return check


async def readiness(checks: Mapping[str, Check]) -> dict[str, str]:
    """Every check's verdict (``"ok"`` or why not), all run at once, each bounded."""

    async def one(check: Check) -> str:
        try:
            failure = await asyncio.wait_for(check(), CHECK_TIMEOUT)
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT:g} s"
        except Exception as exc:  # a failed check is an answer, not a crash
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return "ok" if failure is None else failure

    names = list(checks)
    verdicts = await asyncio.gather(*(one(checks[name]) for name in names))
    return dict(zip(names, verdicts, strict=True))


def health_response(verdicts: Mapping[str, str]) -> JSONResponse:
    """200 ``{"status": "ready", "checks": ...}`` or 503 ``{"status": "not ready", ...}``."""
    ready = all(v == "ok" for v in verdicts.values())
    body = {"status": "ready" if ready else "not ready", "checks": dict(verdicts)}
    return JSONResponse(body, status_code=200 if ready else 503)


def metrics_endpoint(registry: CollectorRegistry) -> Callable[[Request], Awaitable[Response]]:
    """``GET /metrics``: the registry in Prometheus's text format."""

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


def health_app(registry: CollectorRegistry, checks: Mapping[str, Check]) -> Starlette:
    """``/metrics``, ``/livez`` and ``/readyz`` as one small ASGI app."""

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> JSONResponse:
        return health_response(await readiness(checks))

    return Starlette(
        routes=[
            Route(LIVE_PATH, live),
            Route(READY_PATH, ready),
            Route(METRICS_PATH, metrics_endpoint(registry)),
        ]
    )


class _QuietServer(uvicorn.Server):
    """uvicorn inside a daemon that owns its signals: ``core.daemon`` handles them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class MetricsServer:
    """The listener of a daemon without a port of its own; ``None`` address: off.

    Args:
        addr: ``host:port``; port 0 picks a free one (see :attr:`port`).
        registry: the daemon's metrics.
        checks: its readiness checks by name (``broker``, ``database``).
    """

    def __init__(
        self, addr: str | None, registry: CollectorRegistry, checks: Mapping[str, Check]
    ) -> None:
        self.addr = parse_addr(addr) if addr else None
        self._app = health_app(registry, checks)
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int | None:
        """The port it listens on, once started (port 0 resolved)."""
        if self._server is None or not self._server.servers:
            return None
        sockets = self._server.servers[0].sockets
        return int(sockets[0].getsockname()[1]) if sockets else None

    async def start(self) -> None:
        """Listen, or raise :class:`CannotListen`."""
        if self.addr is None:
            return
        host, port = self.addr
        # Bound here, not by uvicorn: uvicorn answers a port in use with sys.exit(1),
        # which would end the whole daemon from inside a task.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise CannotListen(f"cannot listen for metrics on {host}:{port}: {exc}") from exc
        config = uvicorn.Config(
            self._app, log_config=None, access_log=False, lifespan="off", log_level="warning"
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(
            self._server.serve(sockets=[sock]), name="metrics-listener"
        )
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise CannotListen(f"metrics listener on {host}:{port} stopped at start")
            await asyncio.sleep(0.01)
        log.info("metrics and health on http://%s:%s%s", host, self.port, METRICS_PATH)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5)


def broker_check(connected: Callable[[], bool]) -> Check:
    """Ready while ``connected()`` (an MQTT link's ``is_connected``) says so."""

    async def check() -> str | None:
        return None if connected() else "not connected to the broker"

    return check
