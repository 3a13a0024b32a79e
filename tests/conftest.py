"""Fixtures: the services and stacks of ``tests/support/``, set up and torn down.

Only fixtures live here, and one hook that checks the workers' grouping; what they are
built from (the stacks, the servers, the packet encoder) is in ``tests/support/``, which
the benchmarks import too. No module imports
this one or a ``test_*`` module (``tests/test_layout.py`` checks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from history_api import ApiSettings
from store import accounts, make_engine, migrate

from .support.history import postgres_database, serve, sqlite_database
from .support.netns import switched_hosts
from .support.rabbitmq import RabbitCluster
from .support.services import MosquittoServer, PostgresServer, start_mosquitto, start_postgres
from .support.stack import (
    TEMPLATE_DATABASE,
    Stack,
    password_of,
    running,
    start_embedded_stack,
    start_production_stack,
    start_rabbitmq_stack,
    template_copy,
)

#: The session's RabbitMQ cluster: three nodes, so that one can be lost or cut off.
RABBITMQ_NODES = 3


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under ``--dist loadgroup`` (``make test``), a test marked ``xdist_group`` must
    carry its group in its node id, which is how pytest-xdist sends a group to one
    worker. pytest 9.2 broke that silently (pyproject.toml); without this check the
    RabbitMQ cluster is booted once per worker and the CPU-heavy tests overlap."""
    if (
        getattr(item.config.option, "loadgroup", False)
        and item.get_closest_marker("xdist_group") is not None
        and "@" not in item.nodeid
    ):
        pytest.fail(
            "pytest-xdist did not apply this test's xdist_group: check the pytest and "
            "pytest-xdist versions (pyproject.toml)",
            pytrace=False,
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


@pytest.fixture(scope="session")
def shared_rabbitmq(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[Stack]:
    """mqchat on a 3-node RabbitMQ cluster (``tests/support/rabbitmq.py``), its accounts
    checked by the history API; once per session: the cluster's boot is the slowest
    thing the suite starts (20-30 s here). Each node is a host of its own, in a network
    namespace behind a switch (``tests/support/netns.py``), so a test can cut one off.
    Tests add users of their own (``Stack.new_users``) and leave the daemons alone."""
    hosts = [*(f"rabbit{i}" for i in range(RABBITMQ_NODES)), "rabbitctl"]
    with switched_hosts(hosts) as switch:
        base = tmp_path_factory.mktemp("rabbitmq")
        s = asyncio.run(start_rabbitmq_stack(base, postgres, RABBITMQ_NODES, switch))
        try:
            yield s
        finally:
            asyncio.run(s.close())


@pytest.fixture
async def rabbitmq_stack(shared_rabbitmq: Stack) -> AsyncIterator[Stack]:
    """:func:`shared_rabbitmq` for one test: its clients closed after it."""
    s = shared_rabbitmq.view()
    try:
        yield s
    finally:
        await s.close_clients()


@pytest.fixture
def rabbitmq_cluster(shared_rabbitmq: Stack) -> RabbitCluster:
    assert shared_rabbitmq.rabbitmq is not None
    return shared_rabbitmq.rabbitmq


@pytest.fixture(params=["embedded", "production"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    """Both stacks, started for this test alone: for tests that kill, restart or
    configure a daemon, or that need the database to themselves."""
    if request.param == "embedded":
        starting = start_embedded_stack(tmp_path)
    else:
        starting = start_production_stack(tmp_path, request.getfixturevalue("postgres"))
    async with running(starting) as s:
        yield s


@pytest.fixture(scope="session")
def shared_embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = asyncio.run(start_embedded_stack(tmp_path_factory.mktemp("shared-embedded")))
    try:
        yield s
    finally:
        asyncio.run(s.close())


@pytest.fixture(scope="session")
def shared_production(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[Stack]:
    s = asyncio.run(start_production_stack(tmp_path_factory.mktemp("shared-production"), postgres))
    try:
        yield s
    finally:
        asyncio.run(s.close())


@pytest.fixture(params=["embedded", "production"])
def _shared_daemons(request: pytest.FixtureRequest) -> Stack:
    # Synchronous, so that the session fixture it starts lazily runs outside the
    # test's event loop (those start with asyncio.run).
    stack: Stack = request.getfixturevalue(f"shared_{request.param}")
    return stack


@pytest.fixture
async def shared_stack(_shared_daemons: Stack) -> AsyncIterator[Stack]:
    """Both stacks like :func:`stack`, but started once per session (per xdist worker)
    and shared: for tests that leave the daemons and their settings alone and use
    users of their own (``Stack.new_users``). Saves a broker, a bridge and a database
    per test; its clients are closed after each test."""
    s = _shared_daemons.view()
    try:
        yield s
    finally:
        await s.close_clients()


@pytest.fixture
def embedded_broker_env() -> dict[str, str]:
    """Extra ``MQCHAT_BROKER_*`` settings for :func:`embedded`; a test module that needs
    others overrides this fixture."""
    return {}


@pytest.fixture
async def embedded(tmp_path: Path, embedded_broker_env: dict[str, str]) -> AsyncIterator[Stack]:
    """The embedded stack alone, for what only amqtt has (or lacks)."""
    async with running(start_embedded_stack(tmp_path, embedded_broker_env)) as s:
        yield s


@pytest.fixture
async def production_stack(tmp_path: Path, postgres: PostgresServer) -> AsyncIterator[Stack]:
    """For tests about PostgreSQL itself (restarting it, say)."""
    async with running(start_production_stack(tmp_path, postgres)) as s:
        yield s


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    """mosquitto with the production config, for this test alone: for tests that
    restart, crash or reconfigure it."""
    server = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield server
    finally:
        server.close()


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


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The history API with its default settings, served in-process over the test's
    database; with a key for MQTT credentials, so that every route is served."""
    settings = ApiSettings(database_url=database_url, mqtt_credential_secret="test key")
    async with serve(settings) as api:
        yield api
