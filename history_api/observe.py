"""The history API's ``/metrics``, ``/livez`` and ``/readyz``, on its own port.

Requests are counted by route *template* (``/v1/conversations/{conversation_id}/messages``), never
by the path itself, so a label's values stay as few as the routes; a path that matched
no route counts as ``unmatched``. The middleware is plain ASGI, not Starlette's
``BaseHTTPMiddleware``, which would put each request through a second task.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.metrics import (
    LIVE_PATH,
    METRICS_PATH,
    READY_PATH,
    database_check,
    health_response,
    metrics_endpoint,
    readiness,
)

#: Seconds: a cached history page takes a millisecond, an argon2 sign-in ~100 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "mqchat_api_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "mqchat_api_request_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.signin_failures = Counter(
            "mqchat_api_signin_failures",
            "Sign-ins refused for a wrong username or password (and wrong current "
            "passwords when changing one).",
            registry=registry,
        )
        self.signin_throttles = Counter(
            "mqchat_api_signin_throttles",
            "Sign-ins refused with 429 before a password was tried, by reason: failures "
            "(too many failed), sign_ins (too many of one account), busy (too many at once).",
            ["reason"],
            registry=registry,
        )
        self.tokens_issued = Counter(
            "mqchat_api_tokens_issued", "Bearer tokens issued by sign-in.", registry=registry
        )


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = _template(scope)
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


def _template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


router = APIRouter(tags=["health"])


@router.get(LIVE_PATH)
async def livez() -> JSONResponse:
    """The process answers (its event loop is not stuck)."""
    return JSONResponse({"status": "alive"})


@router.get(READY_PATH, responses={503: {"description": "a check failed; the body says which"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready to serve: the database answers and its schema is at the code's head."""
    return health_response(await readiness({"database": database_check(request.app.state.engine)}))


@router.get(
    METRICS_PATH,
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """This process's metrics for Prometheus: counts and latencies by route template,
    never by user or conversation (docs/operations.md lists them)."""
    return await metrics_endpoint(request.app.state.metrics.registry)(request)
