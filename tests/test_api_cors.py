"""The history API served by its own process over HTTP, as a browser on another origin meets it.

A web app on ``https://app.example`` signs in with ``fetch``: the browser first sends a
preflight ``OPTIONS`` and then only lets the page read an answer that names its origin
in ``Access-Control-Allow-Origin``. Every refusal, the router's own included, has the
documented ``{"error": {"code", "detail"}}`` shape.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from history_api import ApiSettings

from .support.history import error_of
from .support.services import Daemon, accepts, free_port, wait_until
from .support.stack import migrated_sqlite, password_of

APP = "https://app.example"
OTHER = "https://evil.example"
CORS_ENV = {"MQCHAT_API_CORS_ORIGINS": f"{APP}, http://localhost:5173"}


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return migrated_sqlite(tmp_path_factory.mktemp("cors") / "api.db", "alice")


@contextlib.asynccontextmanager
async def serve(database_url: str, log_dir: Path, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    port = free_port()
    api = Daemon(
        "api",
        "history_api",
        {"MQCHAT_API_DATABASE_URL": database_url, "MQCHAT_API_PORT": str(port), **env},
        log_dir,
    )
    api.start()
    try:
        await asyncio.to_thread(
            wait_until, lambda: accepts("127.0.0.1", port), timeout=30, what="history API"
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
        assert "Traceback" not in api.log_text()
    finally:
        api.stop()


@pytest.fixture
async def cors_api(database_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(database_url, tmp_path, **CORS_ENV) as client:
        yield client


@pytest.fixture
async def plain_api(database_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(database_url, tmp_path) as client:
        yield client


def preflight(origin: str, method: str = "POST", headers: str = "content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


async def test_an_allowed_origin_signs_in_and_reads_its_token(
    cors_api: httpx.AsyncClient,
) -> None:
    answer = await cors_api.options("/v1/tokens", headers=preflight(APP))
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == APP
    assert "POST" in answer.headers["access-control-allow-methods"]

    signed_in = await cors_api.post(
        "/v1/tokens",
        data={"username": "alice", "password": password_of("alice")},
        headers={"Origin": APP},
    )
    assert signed_in.status_code == 200, signed_in.text
    assert signed_in.headers["access-control-allow-origin"] == APP
    token = signed_in.json()["access_token"]

    check = await cors_api.options(
        "/v1/conversations", headers=preflight(APP, "GET", "authorization")
    )
    assert check.status_code == 200, check.text
    listed = await cors_api.get(
        "/v1/conversations", headers={"Origin": APP, "Authorization": f"Bearer {token}"}
    )
    assert listed.status_code == 200, listed.text
    assert listed.headers["access-control-allow-origin"] == APP

    # A refusal is readable too, with the headers a page needs to act on it.
    refused = await cors_api.get("/v1/conversations", headers={"Origin": APP})
    assert error_of(refused) == (401, "unauthorized")
    assert refused.headers["access-control-allow-origin"] == APP
    assert "www-authenticate" in refused.headers["access-control-expose-headers"].lower()


async def test_an_origin_not_listed_is_not_let_read(cors_api: httpx.AsyncClient) -> None:
    answer = await cors_api.options("/v1/tokens", headers=preflight(OTHER))
    assert answer.status_code == 400
    assert "access-control-allow-origin" not in answer.headers
    signed_in = await cors_api.post(
        "/v1/tokens",
        data={"username": "alice", "password": password_of("alice")},
        headers={"Origin": OTHER},
    )
    assert "access-control-allow-origin" not in signed_in.headers


async def test_no_origin_is_allowed_by_default(plain_api: httpx.AsyncClient) -> None:
    answer = await plain_api.options("/v1/tokens", headers=preflight(APP))
    assert error_of(answer) == (405, "method_not_allowed")
    assert "access-control-allow-origin" not in answer.headers
    signed_in = await plain_api.post(
        "/v1/tokens",
        data={"username": "alice", "password": password_of("alice")},
        headers={"Origin": APP},
    )
    assert signed_in.status_code == 200
    assert "access-control-allow-origin" not in signed_in.headers


@pytest.mark.parametrize("env", [{}, CORS_ENV], ids=["default", "cors"])
async def test_unknown_routes_and_wrong_methods_answer_in_the_error_shape(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    async with serve(database_url, tmp_path, **env) as client:
        assert error_of(await client.get("/v2/conversations")) == (404, "unknown_route")
        assert error_of(await client.get("/", headers={"Origin": APP})) == (404, "unknown_route")
        wrong = await client.delete("/v1/tokens")
        assert error_of(wrong) == (405, "method_not_allowed")
        assert wrong.headers["allow"] == "POST"
        assert error_of(await client.put("/v1/conversations")) == (405, "method_not_allowed")


@pytest.mark.parametrize(
    "origins", ["https://app.example/", "app.example", "https://app.example/path", "ftp://x.y"]
)
def test_an_origin_that_could_never_match_is_refused_at_start(origins: str) -> None:
    """A browser sends ``scheme://host[:port]`` exactly: anything else would fail silently."""
    with pytest.raises(ValidationError, match="is not an origin"):
        ApiSettings(database_url="sqlite://", cors_origins=origins)


def test_origins_are_read_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQCHAT_API_CORS_ORIGINS", " https://a.example ,http://localhost:5173,")
    settings = ApiSettings(database_url="sqlite://")
    assert settings.cors_origins == ["https://a.example", "http://localhost:5173"]
    assert ApiSettings(database_url="sqlite://", cors_origins="*").cors_origins == ["*"]
