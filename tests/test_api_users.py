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

from core.dynsec import Credentials
from core.mqtt import MqttLink
from history_api import ApiSettings
from store import accounts, make_engine
from store.tables import Account

from .support.history import serve
from .support.services import MosquittoServer, free_port, start_mosquitto
from .support.stack import migrated_sqlite


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return migrated_sqlite(tmp_path / "mqchat.db")


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
        server.link_config(
            Credentials(username, password),
            f"{username}:probe-{secrets.token_hex(3)}",
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
    async with serve(mosquitto_settings(database_url, mosquitto)) as client:
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
    async with serve(mosquitto_settings(database_url, mosquitto, **change)) as client:
        response = await create(client, "frank", "frank-pw-1")

    assert error_of(response) == (503, "internal_error")
    assert usernames(database_url) == []


# -- usernames are normalised -----------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "normal"),
    [
        ("Alice", "alice"),
        ("ALICE", "alice"),
        ("\uff41\uff4c\uff49\uff43\uff45", "alice"),  # fullwidth
        ("\u212a.smith", "k.smith"),  # Kelvin sign
        ("Stra\u00dfe", "strasse"),  # case folding, not just lower()
    ],
)
async def test_username_is_normalised(
    client: httpx.AsyncClient, database_url: str, asked: str, normal: str
) -> None:
    response = await create(client, asked, "long-enough")

    assert (response.status_code, response.json()) == (201, {"username": normal})
    assert usernames(database_url) == [normal]


async def test_spellings_of_a_taken_name_are_409(client: httpx.AsyncClient) -> None:
    assert (await create(client, "alice", "long-enough")).status_code == 201
    for spelling in ("Alice", "ALICE", "\uff21lice"):
        assert error_of(await create(client, spelling, "long-enough")) == (409, "username_taken")
    # The Cyrillic look-alike is not the same name, and not a valid one either.
    assert error_of(await create(client, "\u0430lice", "long-enough")) == (
        422,
        "invalid_username",
    )


async def test_sign_in_takes_any_spelling(client: httpx.AsyncClient) -> None:
    await create(client, "alice", "long-enough")
    response = await client.post(
        "/v1/tokens", data={"username": "ALICE", "password": "long-enough"}
    )

    assert response.status_code == 200, response.text
    me = {"Authorization": f"Bearer {response.json()['access_token']}"}
    presence = await client.get("/v1/users/alice/presence", headers=me)
    assert presence.status_code == 200


# -- the password policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    ["short", " " * 12, "\t \u3000 \n\t  ", "Carolina", "PASSWORD", "12345678", "x" * 1025],
    ids=["short", "spaces", "unicode-spaces", "username", "common", "common-digits", "too-long"],
)
async def test_weak_password_is_422(
    client: httpx.AsyncClient, database_url: str, password: str
) -> None:
    response = await create(client, "carolina", password)

    assert error_of(response) == (422, "weak_password")
    assert usernames(database_url) == []


# -- sign-in throttling -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def throttled_api(database_url: str, **limits: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(ApiSettings(database_url=database_url, **limits)) as test_client:  # type: ignore[arg-type]
        for name in ("alice", "bob", "carol"):
            assert (await create(test_client, name, f"{name}-secret")).status_code == 201
        yield test_client


async def sign_in(client: httpx.AsyncClient, user: str, password: str) -> httpx.Response:
    return await client.post("/v1/tokens", data={"username": user, "password": password})


async def test_failed_sign_ins_throttle_the_account(database_url: str) -> None:
    async with throttled_api(database_url, login_failures_per_user="3/minute") as client:
        for _ in range(3):
            assert error_of(await sign_in(client, "alice", "wrong password")) == (
                401,
                "unauthorized",
            )

        throttled = await sign_in(client, "alice", "alice-secret")  # even the right one
        assert error_of(throttled) == (429, "rate_limited")
        assert 0 < int(throttled.headers["retry-after"]) <= 60
        # Other spellings are the same account.
        assert error_of(await sign_in(client, "ALICE", "alice-secret")) == (429, "rate_limited")
        assert (await sign_in(client, "bob", "bob-secret")).status_code == 200


async def test_successful_sign_ins_do_not_count(database_url: str) -> None:
    async with throttled_api(database_url, login_failures_per_user="2/minute") as client:
        for _ in range(5):
            assert (await sign_in(client, "alice", "alice-secret")).status_code == 200
        assert error_of(await sign_in(client, "alice", "wrong")) == (401, "unauthorized")
        assert (await sign_in(client, "alice", "alice-secret")).status_code == 200


async def test_failed_sign_ins_throttle_the_source(database_url: str) -> None:
    async with throttled_api(database_url, login_failures_per_source="3/minute") as client:
        for user in ("alice", "bob", "nobody"):
            assert error_of(await sign_in(client, user, "a guess")) == (401, "unauthorized")

        throttled = await sign_in(client, "carol", "carol-secret")
        assert error_of(throttled) == (429, "rate_limited")
        assert int(throttled.headers["retry-after"]) > 0


async def test_openapi_lists_429_for_sign_in(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()

    assert "429" in document["paths"]["/v1/tokens"]["post"]["responses"]
    assert "429" in document["paths"]["/v1/users/me/password"]["post"]["responses"]


# -- changing one's password ----------------------------------------------------------------


async def token_of(client: httpx.AsyncClient, user: str, password: str) -> dict[str, str]:
    response = await sign_in(client, user, password)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def change(
    client: httpx.AsyncClient, auth: dict[str, str], current: str, new: str
) -> httpx.Response:
    return await client.post(
        "/v1/users/me/password",
        json={"current_password": current, "new_password": new},
        headers=auth,
    )


async def still_signed_in(client: httpx.AsyncClient, auth: dict[str, str]) -> bool:
    response = await client.get("/v1/users/alice/presence", headers=auth)
    assert response.status_code in (200, 401), response.text
    return response.status_code == 200


async def test_password_change(client: httpx.AsyncClient, database_url: str) -> None:
    await create(client, "alice", "alice-secret")
    phone = await token_of(client, "alice", "alice-secret")
    laptop = await token_of(client, "alice", "alice-secret")

    response = await change(client, phone, "alice-secret", "alice's new secret")

    assert response.status_code == 204, response.text
    assert verify(database_url, "alice", "alice's new secret")
    assert not verify(database_url, "alice", "alice-secret")
    assert await still_signed_in(client, phone)  # the caller stays signed in
    assert not await still_signed_in(client, laptop)  # every other token is revoked
    assert error_of(await sign_in(client, "alice", "alice-secret")) == (401, "unauthorized")
    assert (await sign_in(client, "alice", "alice's new secret")).status_code == 200


async def test_password_change_refusals(client: httpx.AsyncClient, database_url: str) -> None:
    await create(client, "alice", "alice-secret")
    auth = await token_of(client, "alice", "alice-secret")

    assert error_of(await change(client, auth, "not it", "a good new one")) == (
        403,
        "wrong_password",
    )
    assert error_of(await change(client, auth, "alice-secret", "short")) == (
        422,
        "weak_password",
    )
    assert error_of(await change(client, auth, "alice-secret", "ALICE")) == (
        422,
        "weak_password",
    )
    assert error_of(await change(client, {}, "alice-secret", "a good new one")) == (
        401,
        "unauthorized",
    )
    assert verify(database_url, "alice", "alice-secret")  # nothing changed


async def test_wrong_current_passwords_are_throttled(database_url: str) -> None:
    async with throttled_api(database_url, login_failures_per_user="2/minute") as client:
        auth = await token_of(client, "alice", "alice-secret")
        for _ in range(2):
            assert error_of(await change(client, auth, "guess", "a good new one")) == (
                403,
                "wrong_password",
            )
        throttled = await change(client, auth, "alice-secret", "a good new one")
        assert error_of(throttled) == (429, "rate_limited")
        assert "retry-after" in throttled.headers


async def test_password_change_reaches_mosquitto(
    mosquitto: MosquittoServer, database_url: str
) -> None:
    async with serve(mosquitto_settings(database_url, mosquitto)) as client:
        assert (await create(client, "grace", "grace-secret")).status_code == 201
        auth = await token_of(client, "grace", "grace-secret")
        response = await change(client, auth, "grace-secret", "grace's new secret")

    assert response.status_code == 204, response.text
    assert await can_connect(mosquitto, "grace", "grace's new secret")
    assert not await can_connect(mosquitto, "grace", "grace-secret")
