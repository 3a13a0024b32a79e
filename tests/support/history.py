"""Data and clients for the history API's tests: a database written through the real
code paths (``persist_batch``, ``accounts.create``), the app served in-process, and a
signed-in user's view of it.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine
from sqlmodel import Session

from history_api import ApiSettings, create_app
from protocol import UpMessage
from store import accounts
from store.messages import StoredMessage, persist_batch
from store.tables import Cursor, CursorMove, Device

from .services import PostgresServer
from .stack import migrated_sqlite, password_of

#: The clock of the history tests' data: messages are sent at ``at(minutes)``.
T0 = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@contextlib.contextmanager
def sqlite_database(directory: Path) -> Iterator[str]:
    yield migrated_sqlite(directory / "history.db")


@contextlib.contextmanager
def postgres_database(postgres: PostgresServer, template: str | None) -> Iterator[str]:
    name = f"history_{secrets.token_hex(6)}"
    postgres.create_database(name, template=template)
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)


def add_users(engine: Engine, *names: str) -> None:
    with Session(engine) as session:
        for name in names:
            accounts.create(session, name, password_of(name))
        session.commit()


def send(
    engine: Engine,
    sender: str,
    body: str,
    *,
    id: str,
    to: str | None = None,
    conversation: str | None = None,
) -> StoredMessage:
    (outcome,) = persist_batch(
        engine, [(sender, UpMessage(id=id, to=to, conversation=conversation, body=body))]
    )
    assert outcome.error is None, outcome.error
    assert outcome.stored is not None
    return outcome.stored


def send_many(engine: Engine, sender: str, to: str, count: int, prefix: str) -> list[str]:
    outcomes = persist_batch(
        engine,
        [
            (sender, UpMessage(id=f"{prefix}{n:03}", to=to, body=f"message number {n}"))
            for n in range(1, count + 1)
        ],
    )
    assert all(o.stored is not None for o in outcomes)
    return [o.stored.client_id for o in outcomes if o.stored is not None]


def move_cursor(
    engine: Engine,
    conversation: str,
    user: str,
    device: str,
    *,
    when: datetime,
    delivered: int | None = None,
    read: int | None = None,
) -> None:
    """What the bridge will do on an ``up/ack``: move the cursor, log the move."""
    with Session(engine) as session:
        cursor = session.get(Cursor, (conversation, user, device)) or Cursor(
            conversation_id=conversation, username=user, device=device
        )
        for kind, seq in (("delivered", delivered), ("read", read)):
            if seq is None:
                continue
            setattr(cursor, f"{kind}_seq", seq)
            setattr(cursor, f"{kind}_at", when)
            session.add(
                CursorMove(
                    conversation_id=conversation,
                    username=user,
                    device=device,
                    kind=kind,
                    up_to=seq,
                    at=when,
                )
            )
        session.add(cursor)
        session.commit()


def set_device(engine: Engine, user: str, device: str, *, online: bool, seen: datetime) -> None:
    with Session(engine) as session:
        session.merge(Device(username=user, device=device, online=online, last_seen=seen))
        session.commit()


@contextlib.asynccontextmanager
async def serve(settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c,
    ):
        yield c


async def sign_in(client: httpx.AsyncClient, user: str, password: str | None = None) -> str:
    response = await client.post(
        "/v1/tokens",
        data={"username": user, "password": password or password_of(user)},
    )
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert isinstance(token, str)
    return token


class As:
    """A signed-in user's view of the API."""

    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}

    async def get(self, url: str, **params: Any) -> httpx.Response:
        return await self.client.get(url, params=params or None, headers=self.headers)

    async def request(self, method: str, url: str, json: Any = None) -> httpx.Response:
        """``method`` on ``url`` as this user, with ``json`` as the body if given."""
        return await self.client.request(method, url, json=json, headers=self.headers)

    async def json(self, url: str, **params: Any) -> Any:
        response = await self.get(url, **params)
        assert response.status_code == 200, response.text
        return response.json()


async def as_user(client: httpx.AsyncClient, user: str) -> As:
    return As(client, await sign_in(client, user))


def error_of(response: Any) -> tuple[int, str]:
    """An HTTP error answer's status and code, checking the documented ``{"error"}`` shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "detail"}, body
    assert body["error"]["detail"], body
    return int(response.status_code), str(body["error"]["code"])
