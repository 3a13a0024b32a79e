"""Fixtures: the services and stacks of ``tests/support/``, set up and torn down.

Only fixtures live here; what they are built from (the stacks, the servers, the packet
encoder) is in ``tests/support/``, which the benchmarks import too. No module imports
this one or a ``test_*`` module (``tests/test_layout.py`` checks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from store import accounts, make_engine, migrate

from .support.history import postgres_database, sqlite_database
from .support.services import PostgresServer, start_postgres
from .support.stack import (
    TEMPLATE_DATABASE,
    Stack,
    password_of,
    start_embedded_stack,
    start_production_stack,
    template_copy,
)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        server.create_database(TEMPLATE_DATABASE)
        engine = make_engine(server.url(TEMPLATE_DATABASE))
        migrate(engine)
        engine.dispose()
        yield server
    finally:
        server.close()


@pytest.fixture(params=["embedded", "production"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "embedded":
        s = await start_embedded_stack(tmp_path)
    else:
        s = await start_production_stack(tmp_path, request.getfixturevalue("postgres"))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def embedded_broker_env() -> dict[str, str]:
    """Extra ``MQCHAT_BROKER_*`` settings for :func:`embedded`; a test module that needs
    others overrides this fixture."""
    return {}


@pytest.fixture
async def embedded(tmp_path: Path, embedded_broker_env: dict[str, str]) -> AsyncIterator[Stack]:
    """The embedded stack alone, for what only amqtt has (or lacks)."""
    s = await start_embedded_stack(tmp_path, embedded_broker_env)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def production_stack(tmp_path: Path, postgres: PostgresServer) -> AsyncIterator[Stack]:
    """For tests about PostgreSQL itself (restarting it, say)."""
    s = await start_production_stack(tmp_path, postgres)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_engine(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresServer
) -> Iterator[Engine]:
    """An empty migrated database with alice, bob and carol, on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = template_copy(postgres, "store")
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as session:
        for user in ("alice", "bob", "carol"):
            accounts.create(session, user, password_of(user))
        session.commit()
    yield engine
    engine.dispose()


# -- the history API's database (tests/support/history.py) ------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        with sqlite_database(tmp_path) as url:
            yield url
    else:
        with postgres_database(request.getfixturevalue("postgres"), TEMPLATE_DATABASE) as url:
            yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()
