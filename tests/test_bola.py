"""Broken object-level authorisation: every endpoint, with another user's object ids.

alice and bob each have a conversation (with carol, with dave), messages (one client
id, ``same``, used by both), cursors on devices (``phone`` for both, and
``alice-laptop`` / ``bob-tablet``). Each endpoint's case swaps bob's conversation ids,
message ids, seqs, device names and username into alice's requests and the other way
round. The rule, which docs/security.md states:

* an object that is not the caller's answers exactly as one that does not exist:
  **404** with the endpoint's stable code (never 403, which would confirm it exists);
* names scoped to the caller (device names) resolve to the caller's own namespace:
  bob's device name in alice's path is alice's device of that name;
* no response to alice ever contains bob's conversation id or message text.

The cases are keyed by route, and the routes come from the app itself: a new endpoint
without a case here fails :func:`test_every_endpoint_has_a_bola_case`.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import Engine

from history_api import ApiSettings, create_app

from .support.history import (
    As,
    add_users,
    as_user,
    at,
    error_of,
    move_cursor,
    send,
    set_device,
    sqlite_database,
)
from .support.push import DeviceKeys


@dataclass
class Side:
    """One user's objects, and what must never leak to the other."""

    name: str
    peer: str
    conversation: str
    message_ids: list[str]
    secret: str
    own_device: str
    api: As


@dataclass
class World:
    alice: Side
    bob: Side

    def pairs(self) -> list[tuple[Side, Side]]:
        """(caller, victim) both ways round."""
        return [(self.alice, self.bob), (self.bob, self.alice)]


@pytest.fixture
async def world(engine: Engine, client: httpx.AsyncClient) -> World:
    add_users(engine, "alice", "bob", "carol", "dave")
    sides = {}
    for user, peer, device in (("alice", "carol", "alice-laptop"), ("bob", "dave", "bob-tablet")):
        secret = f"{user}secret{user}"
        first = send(engine, user, f"{secret} one", id=f"{user}-1", to=peer)
        send(engine, peer, f"{secret} two", id=f"{peer}-2", to=user)
        send(engine, user, f"{secret} same", id="same", to=peer)
        for dev in ("phone", device):
            move_cursor(engine, first.conversation, user, dev, when=at(1), delivered=3, read=2)
            set_device(engine, user, dev, online=True, seen=at(1))
        sides[user] = Side(
            name=user,
            peer=peer,
            conversation=first.conversation,
            message_ids=[f"{user}-1", f"{peer}-2"],
            secret=secret,
            own_device=device,
            api=await as_user(client, user),
        )
    return World(alice=sides["alice"], bob=sides["bob"])


def leaks(response: httpx.Response, victim: Side, *, asked_for_it: bool = False) -> bool:
    """Whether the response shows the victim's messages or (unless the caller put it in
    the request, which a 404's detail repeats) the victim's conversation id."""
    if victim.secret in response.text:
        return True
    return not asked_for_it and victim.conversation in response.text


# -- one case per endpoint --------------------------------------------------------------

Case = Callable[[httpx.AsyncClient, World], Awaitable[None]]


async def list_conversations(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        response = await me.api.get("/v1/conversations", user=victim.name, username=victim.name)
        assert response.status_code == 200
        assert [c["id"] for c in response.json()] == [me.conversation]
        assert not leaks(response, victim)


async def list_messages(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        for params in ({}, {"after": 0}, {"before": 4}, {"after": 0, "before": 99}, {"limit": 1}):
            path = f"/v1/conversations/{victim.conversation}/messages"
            response = await me.api.get(path, **params)
            assert error_of(response) == (404, "unknown_conversation"), (me.name, params)
            assert not leaks(response, victim, asked_for_it=True)
        own = await me.api.get(f"/v1/conversations/{me.conversation}/messages", user=victim.name)
        assert [m["seq"] for m in own.json()["messages"]] == [1, 2, 3]
        assert not leaks(own, victim)


async def list_members(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        response = await me.api.get(f"/v1/conversations/{victim.conversation}/members")
        assert error_of(response) == (404, "unknown_conversation"), me.name
        assert not leaks(response, victim, asked_for_it=True)
        assert victim.peer not in response.text
        own = await me.api.get(f"/v1/conversations/{me.conversation}/members", user=victim.name)
        assert [m["username"] for m in own.json()] == sorted([me.name, me.peer])


async def get_message(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        for message_id in victim.message_ids:
            response = await me.api.get(f"/v1/messages/{message_id}")
            assert error_of(response) == (404, "unknown_message"), (me.name, message_id)
            assert not leaks(response, victim)
        # The id both used: each gets their own message, never the other's.
        response = await me.api.get("/v1/messages/same")
        assert response.status_code == 200
        assert response.json()["message"]["conversation"] == me.conversation
        assert not leaks(response, victim)


async def device_cursors(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        # The victim's device name is, in my path, a device of mine I never used.
        response = await me.api.get(f"/v1/devices/{victim.own_device}/cursors")
        assert response.status_code == 200
        assert response.json() == {"device": victim.own_device, "cursors": []}
        # A name both use: my cursors only.
        response = await me.api.get("/v1/devices/phone/cursors", user=victim.name)
        assert [c["conversation"] for c in response.json()["cursors"]] == [me.conversation]
        assert not leaks(response, victim)


async def presence(client: httpx.AsyncClient, world: World) -> None:
    # Contacts only (issue 19): alice and bob share no conversation, so each is to the
    # other what a name without an account is; and nothing of the victim leaks.
    for me, victim in world.pairs():
        response = await me.api.get(f"/v1/users/{victim.name}/presence")
        assert error_of(response) == (404, "unknown_user"), me.name
        assert not leaks(response, victim)
        assert victim.own_device not in response.text


async def search(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        response = await me.api.get("/v1/search", q=victim.secret, user=victim.name)
        assert response.json() == {"messages": []}
        mine = await me.api.get("/v1/search", q=me.secret)
        assert len(mine.json()["messages"]) == 3
        assert not leaks(mine, victim)


async def create_token(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        response = await client.post(
            "/v1/tokens", data={"username": victim.name, "password": f"{me.name}-secret-pw"}
        )
        assert error_of(response) == (401, "unauthorized")
        assert "access_token" not in response.text


async def each_signs_in_with_their_own(client: httpx.AsyncClient, world: World) -> None:
    """Nobody's password changed: each still signs in with their own, not the other's."""
    for me, _ in world.pairs():
        ok = await client.post(
            "/v1/tokens", data={"username": me.name, "password": f"{me.name}-secret-pw"}
        )
        assert ok.status_code == 200


async def create_user(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        response = await client.post(
            "/v1/users", json={"username": victim.name, "password": f"{me.name}-secret-pw"}
        )
        assert error_of(response) == (409, "username_taken")
    await each_signs_in_with_their_own(client, world)


async def change_password(client: httpx.AsyncClient, world: World) -> None:
    # "me" is whoever the token says: knowing the victim's password changes nothing of
    # theirs, and the caller's own password is only changed with the caller's own.
    for me, victim in world.pairs():
        response = await me.api.request(
            "POST",
            "/v1/users/me/password",
            json={
                "current_password": f"{victim.name}-secret-pw",
                "new_password": "a brand new passphrase",
            },
        )
        assert error_of(response) == (403, "wrong_password")
    await each_signs_in_with_their_own(client, world)


async def mqtt_credential(client: httpx.AsyncClient, world: World) -> None:
    # The body names a device only; the victim's device name is the caller's device of
    # that name, and the credential is the caller's.
    for me, victim in world.pairs():
        response = await me.api.request(
            "POST",
            "/v1/mqtt-credentials",
            json={"device": victim.own_device, "username": victim.name},
        )
        assert response.status_code == 201
        body = response.json()
        assert (body["username"], body["client_id"]) == (me.name, f"{me.name}:{victim.own_device}")
        assert not leaks(response, victim)


async def healthz(client: httpx.AsyncClient, world: World) -> None:
    for me, _ in world.pairs():
        response = await me.api.get("/healthz")
        assert response.json() == {"status": "ok"}


def _subscription(side: str) -> dict[str, object]:
    """A subscription to a public address (never contacted here), told apart by side."""
    return {
        "endpoint": f"https://93.184.216.34/push/{side}",
        "keys": DeviceKeys.new().subscription_keys(),
    }


async def register_push(client: httpx.AsyncClient, world: World) -> None:
    for method in ("POST", "PUT"):
        for me, victim in world.pairs():
            device = secrets.token_hex(4)  # new each call: the world is shared
            # The victim's device name is, in my path, a device of mine: created
            # (201), not the victim's replaced (200), and the victim's stays theirs.
            url = f"/v1/devices/{me.name}-{device}/push"
            theirs = await victim.api.request(method, url, json=_subscription(victim.name))
            mine = await me.api.request(method, url, json=_subscription(me.name))
            assert (theirs.status_code, mine.status_code) == (201, 201), method
            assert f"/push/{victim.name}" not in mine.text


async def replace_push(client: httpx.AsyncClient, world: World) -> None:
    await register_push(client, world)


async def delete_push(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        url = f"/v1/devices/{victim.own_device}/push"
        await victim.api.request("PUT", url, json=_subscription(victim.name))
        response = await me.api.request("DELETE", url)
        assert response.status_code == 204
        # Still there: replacing it is a 200, not a 201.
        again = await victim.api.request("PUT", url, json=_subscription(victim.name))
        assert again.status_code == 200


async def push_key(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        response = await me.api.get("/v1/push/key", user=victim.name)
        assert response.json() == {"vapid_public_key": None}  # no push daemon here


async def push_settings(client: httpx.AsyncClient, world: World) -> None:
    for me, victim in world.pairs():
        response = await me.api.request(
            "PUT", "/v1/push/settings", json={"muted": True, "preview": True}
        )
        assert response.json()["muted"] is True
        theirs = await victim.api.json("/v1/push/settings")
        assert theirs["muted"] is False, "one user's settings changed another's"
        await me.api.request("PUT", "/v1/push/settings", json={"muted": False, "preview": False})


async def mute_conversation(client: httpx.AsyncClient, world: World) -> None:
    for method in ("PUT", "DELETE"):
        for me, victim in world.pairs():
            url = f"/v1/push/mutes/{victim.conversation}"
            response = await me.api.request(method, url)
            assert error_of(response) == (404, "unknown_conversation"), (method, me.name)
            assert not leaks(response, victim, asked_for_it=True)
            own = f"/v1/push/mutes/{me.conversation}"
            response = await me.api.request(method, own)
            assert response.status_code == 204


async def operations(client: httpx.AsyncClient, world: World) -> None:
    # Counts by route template, never by user: nothing of either side is in them.
    for me, _ in world.pairs():
        for path in ("/metrics", "/livez", "/readyz"):
            response = await me.api.get(path)
            assert response.status_code == 200, path
            for side in (world.alice, world.bob):
                assert side.conversation not in response.text
                assert side.secret not in response.text


async def admin_only(client: httpx.AsyncClient, world: World) -> None:
    # Neither alice nor bob is an admin: 403 on every admin route, whoever it names
    # (their own name included), and nothing about anyone in the answer.
    for me, victim in world.pairs():
        for username in (victim.name, me.name, "nobody"):
            for method, path in ADMIN_ROUTES:
                response = await me.api.request(method, path.format(username=username))
                assert error_of(response) == (403, "forbidden"), (method, path)
                assert victim.secret not in response.text


ADMIN_ROUTES = [
    ("GET", "/v1/admin/users"),
    ("GET", "/v1/admin/users/{username}/devices"),
    ("POST", "/v1/admin/users/{username}/disable"),
    ("POST", "/v1/admin/users/{username}/enable"),
    ("POST", "/v1/admin/users/{username}/revoke"),
    ("GET", "/v1/admin/stats"),
]


CASES: dict[tuple[str, str], Case] = {
    ("GET", "/v1/conversations"): list_conversations,
    ("GET", "/v1/conversations/{conversation_id}/messages"): list_messages,
    ("GET", "/v1/conversations/{conversation_id}/members"): list_members,
    ("GET", "/v1/messages/{message_id}"): get_message,
    ("GET", "/v1/devices/{device}/cursors"): device_cursors,
    ("GET", "/v1/users/{username}/presence"): presence,
    ("GET", "/v1/search"): search,
    ("POST", "/v1/tokens"): create_token,
    ("POST", "/v1/users"): create_user,
    ("POST", "/v1/users/me/password"): change_password,
    ("POST", "/v1/mqtt-credentials"): mqtt_credential,
    ("GET", "/healthz"): healthz,
    ("GET", "/v1/push/key"): push_key,
    ("POST", "/v1/devices/{device}/push"): register_push,
    ("PUT", "/v1/devices/{device}/push"): replace_push,
    ("DELETE", "/v1/devices/{device}/push"): delete_push,
    ("GET", "/v1/push/settings"): push_settings,
    ("PUT", "/v1/push/settings"): push_settings,
    ("PUT", "/v1/push/mutes/{conversation}"): mute_conversation,
    ("DELETE", "/v1/push/mutes/{conversation}"): mute_conversation,
    ("GET", "/metrics"): operations,
    ("GET", "/livez"): operations,
    ("GET", "/readyz"): operations,
    **{(method, path): admin_only for method, path in ADMIN_ROUTES},
}


def routes_of_the_app(tmp_path: Path) -> set[tuple[str, str]]:
    """Every operation the app serves, from its OpenAPI document (FastAPI 0.165 nests
    included routers, so ``app.routes`` no longer lists the endpoints themselves)."""
    with sqlite_database(tmp_path) as url:
        app = create_app(ApiSettings(database_url=url, mqtt_credential_secret="test key"))
    # The documentation pages (served locally by fastapi-offline, so APIRoutes of the
    # app) hold no user's data.
    docs = {"/docs", "/docs/oauth2-redirect", "/redoc"}
    hidden = [
        r
        for r in app.routes
        if isinstance(r, APIRoute) and not r.include_in_schema and r.path not in docs
    ]
    assert not hidden, f"endpoints left out of the OpenAPI document: {hidden}"
    return {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }


def test_every_endpoint_has_a_bola_case(tmp_path: Path) -> None:
    routes = routes_of_the_app(tmp_path)
    missing = routes - set(CASES)
    assert not missing, f"endpoints without a BOLA case in tests/test_bola.py: {sorted(missing)}"
    assert set(CASES) <= routes, f"cases for endpoints that are gone: {set(CASES) - routes}"


async def test_cross_user_access(client: httpx.AsyncClient, world: World) -> None:
    # One world for all cases (signing in is argon2-slow); none of them changes it.
    for (method, path), case in CASES.items():
        try:
            await case(client, world)
        except AssertionError as exc:
            raise AssertionError(f"{method} {path}: {exc}") from exc
