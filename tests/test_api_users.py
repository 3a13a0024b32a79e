"""``POST /v1/users`` and ``GET /healthz`` of the history API, on a real SQLite file.

The app runs inside its own lifespan, so the engine is made and disposed as in
production; requests go through httpx's ASGI transport. The mosquitto cases run the
production config from its binary.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlmodel import Session, select

from clients.mqtt import LinkConfig, MqttLink
from history_api import ApiSettings, create_app
from store import accounts, make_engine, migrate
from store.tables import Account

from .services import MosquittoServer, free_port, start_mosquitto


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'mqchat.db'}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    return url


@contextlib.asynccontextmanager
async def api(settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c,
    ):
        yield c


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api(ApiSettings(database_url=database_url)) as test_client:
        yield test_client


async def create(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/v1/users", json={"username": username, "password": password})


def verify(database_url: str, username: str, password: str) -> bool:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return accounts.verify(session, username, password)
    finally:
        engine.dispose()


def usernames(database_url: str) -> list[str]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(Account.username)).all())
    finally:
        engine.dispose()


def error_of(response: httpx.Response) -> tuple[int, str]:
    status = response.status_code
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "detail"}, body
    assert body["error"]["detail"], body
    return status, body["error"]["code"]


async def test_created_account_verifies(client: httpx.AsyncClient, database_url: str) -> None:
    response = await create(client, "alice", "alice-secret")

    assert response.status_code == 201
    assert response.json() == {"username": "alice"}
    assert verify(database_url, "alice", "alice-secret")
    assert not verify(database_url, "alice", "wrong-password")


async def test_duplicate_username_is_409(client: httpx.AsyncClient) -> None:
    first = await create(client, "bob", "bob-secret")
    again = await create(client, "bob", "other-secret")

    assert first.status_code == 201
    assert error_of(again) == (409, "username_taken")


@pytest.mark.parametrize(
    "username",
    [
        "al/ice",
        "al+ice",
        "al#ice",
        "$alice",
        "a" * 33,
        "a",
        "",
        "al ice",
        "al-ice",
        "\u0430lice",  # Cyrillic a: NFKC keeps it, so it is refused, not confused
        "alice\u200b",  # zero-width space
        "\uff0b" + "alice",  # fullwidth plus: NFKC makes it a real '+'
        "\uff03",  # fullwidth '#'
        "a" * 65,  # refused before normalising
    ],
)
async def test_bad_username_is_422(
    client: httpx.AsyncClient, database_url: str, username: str
) -> None:
    response = await create(client, username, "long-enough")

    assert error_of(response) == (422, "invalid_username")
    assert usernames(database_url) == []


async def test_short_password_is_422(client: httpx.AsyncClient, database_url: str) -> None:
    response = await create(client, "carol", "short")

    assert error_of(response) == (422, "weak_password")
    assert usernames(database_url) == []


@pytest.mark.parametrize(
    "content",
    [
        b'{"username": "dave", "password": ',
        b"not json",
        b"[]",
        b'{"username": "dave"}',
        b'{"username": 5, "password": "long-enough"}',
    ],
    ids=["truncated", "not-json", "array", "missing-password", "number"],
)
async def test_malformed_body_is_422_invalid_payload(
    client: httpx.AsyncClient, database_url: str, content: bytes
) -> None:
    response = await client.post(
        "/v1/users", content=content, headers={"content-type": "application/json"}
    )

    assert error_of(response) == (422, "invalid_payload")
    assert usernames(database_url) == []


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_openapi_lists_account_creation(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()

    operation = document["paths"]["/v1/users"]["post"]
    assert {"201", "409", "422", "503"} <= set(operation["responses"])
    error_schema = operation["responses"]["409"]["content"]["application/json"]["schema"]
    assert error_schema == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "/healthz" in document["paths"]


# -- with mosquitto ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    server = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield server
    finally:
        server.close()


def mosquitto_settings(
    database_url: str, server: MosquittoServer, **changes: object
) -> ApiSettings:
    values: dict[str, object] = {
        "database_url": database_url,
        "mosquitto_host": server.host,
        "mosquitto_port": server.port,
        "mosquitto_admin_username": server.admin.username,
        "mosquitto_admin_password": SecretStr(server.admin.password),
        **changes,
    }
    return ApiSettings(**values)  # type: ignore[arg-type]


async def can_connect(server: MosquittoServer, username: str, password: str) -> bool:
    link = MqttLink(
        LinkConfig(
            host=server.host,
            port=server.port,
            username=username,
            password=password,
            client_id=f"{username}:probe-{secrets.token_hex(3)}",
            clean_session=True,
        )
    )
    try:
        await link.connect()
    except Exception:
        return False
    await link.close()
    return True


async def test_account_is_created_in_mosquitto_too(
    mosquitto: MosquittoServer, database_url: str
) -> None:
    async with api(mosquitto_settings(database_url, mosquitto)) as client:
        response = await create(client, "erin", "erin-secret")

    assert response.status_code == 201
    assert verify(database_url, "erin", "erin-secret")
    assert await can_connect(mosquitto, "erin", "erin-secret")


@pytest.mark.parametrize("broken", ["unreachable", "wrong-admin-password"])
async def test_broker_failure_is_503_and_creates_nothing(
    mosquitto: MosquittoServer, database_url: str, broken: str
) -> None:
    change: dict[str, object] = (
        {"mosquitto_port": free_port()}
        if broken == "unreachable"
        else {"mosquitto_admin_password": SecretStr("not-the-password")}
    )
    async with api(mosquitto_settings(database_url, mosquitto, **change)) as client:
        response = await create(client, "frank", "frank-pw-1")

    assert error_of(response) == (503, "internal_error")
    assert usernames(database_url) == []
