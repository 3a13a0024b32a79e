"""MQTT credentials (``POST /v1/mqtt-credentials``, ``core.credentials``) on both stacks.

A device that signed in over HTTP connects to MQTT with a short-lived credential in
place of the account password. What must hold on the embedded gate and on mosquitto
(our plugin) alike: it works for its own user and client id and nothing else, it
expires, a forged or malformed one costs nothing and is refused with CONNACK 5, and
revoking the account's tokens (password change, disable) ends it and the connections
made with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import time
from datetime import datetime
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session

from core.accounts import set_disabled
from core.mqtt import ConnectRefused, LinkConfig, MqttError, MqttLink
from protocol import topics
from store import admin as store_admin

from .support.clients import paho_answer, wait_until
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
    if stack.mosquitto is not None:
        # Refused by our plugin itself: dynsec's password hashing never saw them.
        refusals = stack.mosquitto.log_tail(400).count("refused a credential of user 'alice'")
        assert refusals == len(forged)
    # The genuine one still works after all that.
    assert (await connect(stack, cred)).is_connected


async def test_a_password_change_revokes_credentials_and_drops_their_connections(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    await stack.add_users("alice")
    token = await bearer(api, "alice")
    cred = await credential(api, token)
    link = await connect(stack, cred)

    changed = await api.post(
        "/v1/users/me/password",
        json={"current_password": password_of("alice"), "new_password": "another-pw-42"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert changed.status_code == 204, changed.text

    await wait_until(lambda: not link.is_connected, "the credential's connection to drop")
    assert "not authori" in await refusal(stack, "alice", cred["password"], cred["client_id"])
    # The token that changed the password is kept: it gets a working credential.
    fresh = await credential(api, token)
    assert (await connect(stack, fresh)).is_connected


async def test_disabling_the_account_revokes_credentials_for_good(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    await stack.add_users("alice")
    cred = await credential(api, await bearer(api, "alice"))
    link = await connect(stack, cred)

    async with stack.provisioner() as provisioner:
        await set_disabled(stack.engine, provisioner, "alice", disabled=True)
    await wait_until(lambda: not link.is_connected, "the credential's connection to drop")
    assert "not authori" in await refusal(stack, "alice", cred["password"], cred["client_id"])

    async with stack.provisioner() as provisioner:
        await set_disabled(stack.engine, provisioner, "alice", disabled=False)
    # Enabled again, the old credential stays revoked; a new sign-in gets a new one.
    assert "not authori" in await refusal(stack, "alice", cred["password"], cred["client_id"])
    fresh = await credential(api, await bearer(api, "alice"))
    assert (await connect(stack, fresh)).is_connected


async def test_an_admin_revoke_ends_credentials_and_their_connections(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    """``POST /v1/admin/users/{u}/revoke`` signs a user out everywhere: the bearer
    tokens and MQTT credentials stop working and the credential's connection drops,
    on mosquitto too (its plugin is told); the password still signs in."""
    await stack.add_users("root", "alice")
    with Session(stack.engine) as session:
        store_admin.set_admin(session, "root", True)
        session.commit()
    token = await bearer(api, "alice")
    cred = await credential(api, token)
    link = await connect(stack, cred)

    revoked = await api.post(
        "/v1/admin/users/alice/revoke",
        headers={"Authorization": f"Bearer {await bearer(api, 'root')}"},
    )
    assert revoked.json() == {"username": "alice", "tokens_revoked": 1}, revoked.text

    await wait_until(lambda: not link.is_connected, "the credential's connection to drop")
    assert "not authori" in await refusal(stack, "alice", cred["password"], cred["client_id"])
    stale = await api.post(
        "/v1/mqtt-credentials",
        json={"device": "phone"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert stale.status_code == 401, stale.text
    assert (await stack.raw("alice")).is_connected


async def test_a_credential_expires(stack: Stack) -> None:
    await stack.add_users("alice")
    url = await stack.start_api(mqtt_credential_ttl=1)
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as api:
        cred = await credential(api, await bearer(api, "alice"))
    expires = datetime.fromisoformat(cred["expires_at"]).timestamp()
    assert expires - time.time() <= 1.5
    # The broker compares whole seconds of its clock with the expiry: mosquitto's
    # plugin reads time(), glibc's coarse clock, which may lag time.time() by a tick
    # of the kernel (CI once connected at the boundary). A tenth of a second past it.
    await wait_until(lambda: time.time() >= expires + 0.1, "the credential to expire")
    assert "not authori" in await refusal(stack, "alice", cred["password"], cred["client_id"])


def mosquitto_client(stack: Stack, cred: dict[str, Any], *args: str) -> str:
    """mosquitto_pub or _sub (``args[0]``) signed in with ``cred``; what it printed,
    and its exit status."""
    done = subprocess.run(
        [
            args[0],
            *("-h", stack.host, "-p", str(stack.port), "-q", "1"),
            *("-u", cred["username"], "-P", cred["password"], "-i", cred["client_id"]),
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    return f"{done.stdout}{done.stderr}exit {done.returncode}"


async def test_stock_clients_chat_with_a_credential(stack: Stack, api: httpx.AsyncClient) -> None:
    """mosquitto_pub and plain paho, which know nothing of mqchat, use the credential
    as a password; mosquitto_sub with another client id is told it is not authorised."""
    await stack.add_users("alice", "bob")
    bob = await stack.client("bob")
    cred = await credential(api, await bearer(api, "alice"), "cli")
    body = f"from mosquitto_pub {secrets.token_hex(2)}"
    uplink = json.dumps({"id": secrets.token_hex(4), "to": "bob", "body": body})
    published = await asyncio.to_thread(
        mosquitto_client, stack, cred, "mosquitto_pub", "-t", topics.up_msg("alice"), "-m", uplink
    )
    assert published.endswith("exit 0"), published
    assert (await bob.next_message(timeout=WAIT)).body == body

    foreign = dict(cred, client_id="alice:other")
    subscribed = await asyncio.to_thread(
        mosquitto_client, stack, foreign, "mosquitto_sub", "-t", topics.down_all("alice"), "-E"
    )
    assert "not authorised" in subscribed.lower(), subscribed

    paho_cred = await credential(api, await bearer(api, "alice"), "paho")
    assert await asyncio.to_thread(paho_connect, stack, paho_cred) == "Success"
    wrong = dict(paho_cred, client_id="alice:cli")
    assert await asyncio.to_thread(paho_connect, stack, wrong) == "Not authorized"


def paho_connect(stack: Stack, cred: dict[str, Any]) -> str:
    """Connect with plain paho (MQTT 3.1.1); the CONNACK's reason."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cred["client_id"])
    client.username_pw_set(cred["username"], cred["password"])
    return paho_answer(stack, client)


async def test_a_credential_works_over_websockets(stack: Stack, api: httpx.AsyncClient) -> None:
    """The browser's way in: MQTT over WebSocket, the same credential rules."""
    await stack.add_users("alice")
    cred = await credential(api, await bearer(api, "alice"), "web")
    if stack.mosquitto is not None:
        ws_port = stack.mosquitto.ws_port
    else:
        assert stack.embedded_broker is not None
        ws_port = stack.embedded_broker.settings.ws_port  # type: ignore[union-attr]
    link = MqttLink(
        LinkConfig(
            host=stack.host,
            port=ws_port,
            transport="websockets",
            username=cred["username"],
            password=cred["password"],
            client_id=cred["client_id"],
            clean_session=True,
        )
    )
    try:
        await link.connect()
        await link.subscribe(topics.down_all("alice"), qos=1)
    finally:
        await link.close()


async def test_a_user_cannot_revoke_anothers_credentials(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    """``$CONTROL/mqchat/v1`` is the API's (an exempt account's) alone: a user who
    publishes a revocation there changes nothing."""
    await stack.add_users("alice", "bob")
    cred = await credential(api, await bearer(api, "bob"))
    mallory = await stack.raw("alice")
    with contextlib.suppress(MqttError):  # dropped or refused: either way, no effect
        await asyncio.wait_for(
            mallory.publish("$CONTROL/mqchat/v1", b"revoke bob 999999 abcd", qos=1), WAIT
        )
    assert (await connect(stack, cred)).is_connected
