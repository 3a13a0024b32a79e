"""The FastAPI application, built per call: nothing is opened at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from core.metrics import new_registry
from store import make_engine, reading, signin

from . import (
    admin,
    broker_auth,
    conversations,
    credentials,
    devices,
    errors,
    health,
    messages,
    observe,
    push,
    search,
    tokens,
    users,
    web,
)
from .config import ApiSettings
from .throttle import SignInGuard


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = make_engine(settings.database_url)
        app.state.reading_engine = reading(app.state.engine)
        try:
            yield
        finally:
            app.state.engine.dispose()

    # /docs and /redoc from assets shipped in the package, not a CDN: they work
    # offline, behind a firewall and under a strict CSP alike.
    app = FastAPIOffline(
        title="mqchat history API",
        version="1",
        summary="Accounts, tokens, conversation history, delivery traces, presence and search.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    if settings.cors_origins:
        # Bearer tokens, not cookies: no credentials mode. Retry-After and
        # WWW-Authenticate are exposed so a page can act on a 429 or a 401.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "WWW-Authenticate"],
            max_age=600,
        )
    app.state.metrics = observe.ApiMetrics(new_registry())
    app.add_middleware(observe.MetricsMiddleware, metrics=app.state.metrics)
    app.state.sign_in_guard = SignInGuard(settings, app.state.metrics)
    signin.configure(rate=settings.sign_ins_per_second, burst=settings.sign_in_burst)
    errors.install(app)
    app.include_router(users.router)
    app.include_router(tokens.router)
    if settings.mqtt_credential_secret is not None:
        # Without a key there is nothing to sign with: no route (404 unknown_route).
        app.include_router(credentials.router)
    app.include_router(conversations.router)
    app.include_router(messages.router)
    app.include_router(devices.router)
    app.include_router(push.router)
    app.include_router(search.router)
    app.include_router(health.router)
    app.include_router(observe.router)
    app.include_router(admin.router)
    app.include_router(broker_auth.router)
    if settings.web_dir is not None:
        web.install(app, settings, settings.web_dir)
    return app
