"""What route handlers may ask for, as ``Annotated`` aliases.

Everything comes from ``app.state`` (filled by :func:`history_api.app.create_app` and
its lifespan), never from module globals, so two apps in one process (tests) do not
share an engine.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Final

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy import Engine, event
from sqlalchemy.orm import ORMExecuteState, UOWTransaction
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from core.accounts import EmbeddedProvisioner, Provisioner
from core.dynsec import DynsecProvisioner, ProvisioningError
from core.mqtt import LinkConfig, MqttError
from protocol import errors
from store import tokens

from .config import ApiSettings
from .throttle import SignInGuard

TOKEN_URL: Final = "/v1/tokens"  # noqa: S105 (a path, not a secret)

#: Opens a provisioner for the length of one ``async with``.
OpenProvisioner = Callable[[], contextlib.AbstractAsyncContextManager[Provisioner]]


def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_sign_in_guard(request: Request) -> SignInGuard:
    guard: SignInGuard = request.app.state.sign_in_guard
    return guard


def get_client_address(request: Request) -> str:
    """The address failed sign-ins are counted against (the peer, or the proxy's)."""
    return request.client.host if request.client is not None else "unknown"


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
SignInGuardDep = Annotated[SignInGuard, Depends(get_sign_in_guard)]
ClientAddress = Annotated[str, Depends(get_client_address)]
EngineDep = Annotated[Engine, Depends(get_engine)]


class ReadingSession(Session):
    """A session that refuses to write.

    On PostgreSQL it runs in autocommit (:func:`store.db.reading`), where writes would
    commit one statement at a time instead of all or nothing; failing loudly keeps
    a route from doing that by accident.
    """


def _refuse(what: str) -> RuntimeError:
    return RuntimeError(f"SessionDep only reads ({what}); write with Session(EngineDep) + commit")


@event.listens_for(ReadingSession, "before_flush")
def _refuse_flush(session: Session, flush_context: UOWTransaction, instances: object) -> None:
    raise _refuse("flush")


@event.listens_for(ReadingSession, "do_orm_execute")
def _refuse_dml(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        raise _refuse("INSERT/UPDATE/DELETE")


def get_reading_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.reading_engine
    return engine


#: The engine for transactions that only read (:func:`store.db.reading`).
ReadingEngineDep = Annotated[Engine, Depends(get_reading_engine)]


async def get_session(engine: ReadingEngineDep) -> AsyncIterator[Session]:
    """A session for a route that only reads; a route that writes opens its own on
    :data:`EngineDep` and commits.

    Async on purpose: making a session does no I/O (it connects on first use, in the
    route's thread), so only closing it needs a worker thread. That saves a thread hop
    per request on the history API's hot path.
    """
    session = ReadingSession(engine)
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(get_session)]

#: Declares the OAuth2 password flow in the OpenAPI document. auto_error is off so
#: that a missing token gets our error body (``unauthorized``), not FastAPI's.
bearer_token = OAuth2PasswordBearer(tokenUrl=TOKEN_URL, auto_error=False)


def get_current_user(
    session: SessionDep, token: Annotated[str | None, Depends(bearer_token)]
) -> str:
    """The username the request's bearer token signs in.

    Raises:
        ProtocolError: ``unauthorized`` (401) for no token or one that is unknown or
            expired; the error handler adds ``WWW-Authenticate: Bearer``.
    """
    if not token:
        raise errors.ProtocolError(
            errors.UNAUTHORIZED,
            f"send 'Authorization: Bearer <token>' with a token from POST {TOKEN_URL}",
        )
    username = tokens.resolve(session, token)
    if username is None:
        raise errors.ProtocolError(
            errors.UNAUTHORIZED,
            f"the token is unknown or has expired; get a new one from POST {TOKEN_URL}",
        )
    return username


CurrentUser = Annotated[str, Depends(get_current_user)]


def get_current_token(token: Annotated[str | None, Depends(bearer_token)]) -> str | None:
    """The caller's bearer token itself (after :data:`CurrentUser` has checked it)."""
    return token


CurrentToken = Annotated[str | None, Depends(get_current_token)]


def get_provisioner(settings: SettingsDep) -> OpenProvisioner:
    """A connection to mosquitto's admin API per account creation.

    Accounts are created rarely; a connection per request means the API starts and
    stays healthy while mosquitto is down, and only account creation reports it.
    """

    @contextlib.asynccontextmanager
    async def open_provisioner() -> AsyncIterator[Provisioner]:
        password = settings.mosquitto_admin_password
        if password is None:
            yield EmbeddedProvisioner()
            return
        config = LinkConfig(
            host=settings.mosquitto_host,
            port=settings.mosquitto_port,
            username=settings.mosquitto_admin_username,
            password=password.get_secret_value(),
            # Unique and clean: concurrent requests must not take over each
            # other's connection, and nothing should stay queued for them.
            client_id=f"mqchat-api-{secrets.token_hex(6)}",
            clean_session=True,
            connect_timeout=5.0,
        )
        async with contextlib.AsyncExitStack() as stack:
            try:
                provisioner = await stack.enter_async_context(DynsecProvisioner(config))
            except (OSError, MqttError) as exc:
                raise ProvisioningError(
                    "connect",
                    f"mosquitto at {config.host}:{config.port} as {config.username}: {exc}",
                ) from exc
            yield provisioner

    return open_provisioner


ProvisionerDep = Annotated[OpenProvisioner, Depends(get_provisioner)]
