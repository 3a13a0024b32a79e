"""MQTT credentials (``POST /v1/mqtt-credentials``, ``core.credentials``) on both stacks.

A device that signed in over HTTP connects to MQTT with a short-lived credential in
place of the account password. What must hold on the embedded gate and on mosquitto
(our plugin) alike: it works for its own user and client id and nothing else, it
expires, a forged or malformed one costs nothing and is refused with CONNACK 5, and
revoking the account's tokens (password change, disable) ends it and the connections
made with it.
"""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from core.mqtt import ConnectRefused, MqttLink

from .support.stack import Stack, password_of

WAIT = 15.0


async def bearer(api: httpx.AsyncClient, user: str) -> str:
    answer = await api.post("/v1/tokens", data={"username": user, "password": password_of(user)})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


async def credential(api: httpx.AsyncClient, token: str, device: str = "phone") -> dict[str, Any]:
    answer = await api.post(
        "/v1/mqtt-credentials",
        json={"device": device},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 201, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body: dict[str, Any] = answer.json()
    return body


async def connect(stack: Stack, cred: dict[str, Any], **changes: str) -> MqttLink:
    """A stock client connected with ``cred`` (``changes``: client_id, password...)."""
    values = {"client_id": cred["client_id"], "password": cred["password"]} | changes
    return await stack.raw(cred["username"], values["password"], client_id=values["client_id"])


async def refusal(stack: Stack, user: str, password: str, client_id: str) -> str:
    link = await stack.raw(user, password, client_id=client_id, connect=False)
    with pytest.raises(ConnectRefused) as refused:
        await link.connect()
    await link.close()
    return refused.value.reason.lower()


@pytest.fixture
def stack(embedded: Stack) -> Stack:
    """The embedded stack only, until mosquitto's plugin checks credentials too."""
    return embedded


@pytest.fixture
async def api(stack: Stack) -> Any:
    url = await stack.start_api()
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as client:
        yield client


async def test_a_credential_signs_in_as_its_device_only(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    await stack.add_users("alice", "bob")
    token = await bearer(api, "alice")
    cred = await credential(api, token, "phone")
    assert (cred["username"], cred["client_id"]) == ("alice", "alice:phone")
    assert cred["password"] != password_of("alice")

    link = await connect(stack, cred)
    assert link.is_connected

    # Another device of alice's, or bob's name: the credential names one client id.
    assert "not authori" in await refusal(stack, "alice", cred["password"], "alice:laptop")
    assert "not authori" in await refusal(stack, "bob", cred["password"], "alice:phone")
    assert "not authori" in await refusal(stack, "bob", cred["password"], "bob:phone")


async def test_credentials_need_a_token_and_a_device(stack: Stack, api: httpx.AsyncClient) -> None:
    await stack.add_users("alice")
    no_token = await api.post("/v1/mqtt-credentials", json={"device": "phone"})
    assert no_token.status_code == 401
    assert no_token.json()["error"]["code"] == "unauthorized"
    token = await bearer(api, "alice")
    auth = {"Authorization": f"Bearer {token}"}
    for body in ({}, {"device": ""}, {"device": "x" * 65}, {"device": "a\x00b"}, {"device": 5}):
        answer = await api.post("/v1/mqtt-credentials", json=body, headers=auth)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error"]["code"] == "invalid_payload"


async def test_forged_and_hostile_credentials_are_refused(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    await stack.add_users("alice")
    cred = await credential(api, await bearer(api, "alice"))
    prefix, expires, issued, generation, mac = cred["password"].split(".")
    forged = [
        # A later expiry, another generation, another MAC: each breaks the HMAC.
        ".".join((prefix, str(int(expires) + 3600), issued, generation, mac)),
        ".".join((prefix, expires, issued, str(int(generation) + 1), mac)),
        ".".join((prefix, expires, issued, generation, secrets.token_hex(32))),
        ".".join((prefix, expires, issued, generation, mac.upper())),
        # Malformed and huge: refused without being read further.
        "mqc1.",
        "mqc1." + "9" * 5000,
        cred["password"] + "0",
        "mqc1." + "x" * 60_000,
    ]
    for password in forged:
        assert "not authori" in await refusal(stack, "alice", password, "alice:phone")
    # The genuine one still works after all that.
    assert (await connect(stack, cred)).is_connected
