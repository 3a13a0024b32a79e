"""The history API's answers to RabbitMQ's HTTP auth backend (``history_api/broker_auth.py``),
question by question; ``tests/test_rabbitmq_isolation.py`` runs them on a cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from history_api import ApiSettings

from .support.history import serve
from .support.stack import migrated_sqlite, password_of

SECRET = "broker-auth-test-secret"
BASE = f"/broker-auth/{SECRET}"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    url = migrated_sqlite(tmp_path / "auth.db", "alice", "bob", "bobby")
    async with serve(ApiSettings(database_url=url, broker_auth_secret=SecretStr(SECRET))) as c:
        yield c


async def ask(api: httpx.AsyncClient, question: str, **form: str) -> str:
    answer = await api.post(f"{BASE}/{question}", data={"vhost": "/", **form})
    assert answer.status_code == 200, answer.text
    return answer.text


async def test_off_without_the_secret(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "off.db", "alice")
    form = {"username": "alice", "password": password_of("alice")}
    async with serve(ApiSettings(database_url=url)) as off:
        assert (await off.post(f"{BASE}/user", data=form)).status_code == 404
        assert "broker-auth" not in (await off.get("/openapi.json")).text


async def test_a_wrong_secret_is_not_found(api: httpx.AsyncClient) -> None:
    form = {"username": "alice", "password": password_of("alice")}
    assert (await api.post("/broker-auth/guess/user", data=form)).status_code == 404


async def test_sign_in(api: httpx.AsyncClient) -> None:
    good = {"username": "alice", "password": password_of("alice")}
    assert await ask(api, "user", **good) == "allow"
    assert await ask(api, "user", **good, client_id="alice:phone") == "allow"
    assert await ask(api, "user", **good, client_id="bob:phone") == "deny"
    assert await ask(api, "user", **good, client_id="alicex") == "deny"
    assert await ask(api, "user", username="alice", password="wrong-password") == "deny"
    assert await ask(api, "user", username="nobody", password="whatever-pw") == "deny"
    assert await ask(api, "vhost", username="alice") == "allow"
    assert await ask(api, "vhost", username="alice", vhost="other") == "deny"


async def test_a_dotted_name_is_never_let_in(api: httpx.AsyncClient) -> None:
    assert await ask(api, "user", username="al.ice", password=password_of("al.ice")) == "deny"
    answer = await api.post("/v1/users", json={"username": "al.ice", "password": "long-enough-pw"})
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_username"


@pytest.mark.parametrize(
    ("resource", "name", "permission", "expected"),
    [
        ("queue", "mqtt-subscription-alice:phoneqos1", "configure", "allow"),
        ("queue", "mqtt-subscription-aliceqos0", "read", "allow"),
        ("queue", "mqtt-subscription-bob:phoneqos1", "read", "deny"),
        ("queue", "mqtt-subscription-alicexqos1", "write", "deny"),
        ("queue", "uplinks.0", "read", "deny"),
        ("exchange", "amq.topic", "write", "allow"),
        ("exchange", "amq.topic", "read", "allow"),
        ("exchange", "amq.topic", "configure", "deny"),
        ("exchange", "amq.direct", "write", "deny"),
    ],
)
async def test_resources(
    api: httpx.AsyncClient, resource: str, name: str, permission: str, expected: str
) -> None:
    form = {"username": "alice", "resource": resource, "name": name, "permission": permission}
    assert await ask(api, "resource", **form) == expected


@pytest.mark.parametrize(
    ("routing_key", "permission", "expected"),
    [
        ("chat.v1.u.bob.up.msg", "write", "allow"),
        ("chat.v1.u.bobby.up.msg", "write", "deny"),
        ("chat.v1.u.bob.down.msg", "write", "deny"),
        ("chat.v1.u.bob.down.#", "read", "allow"),
        ("chat.v1.u.bob.down.*", "read", "allow"),
        ("chat.v1.u.bob.#", "read", "deny"),
        ("chat.v1.u.*.down.#", "read", "deny"),
        ("#", "read", "deny"),
        ("chat.v1.u.bob.up.msg", "configure", "deny"),
    ],
)
async def test_topics(
    api: httpx.AsyncClient, routing_key: str, permission: str, expected: str
) -> None:
    form = {
        "username": "bob",
        "resource": "topic",
        "name": "amq.topic",
        "permission": permission,
        "routing_key": routing_key,
    }
    assert await ask(api, "topic", **form) == expected
