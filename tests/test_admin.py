"""The admin API on both databases: what an admin may do, and the log line of each change.

Ordinary users' 403 on every admin route is in ``tests/test_bola.py`` with every other
route's authorisation; the role itself is granted only by ``mqchat user admin``
(``tests/test_cli.py``).
"""

from __future__ import annotations

import logging

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from store import admin as store_admin
from store import push

from .support.history import add_users, as_user, at, error_of, set_device, sign_in
from .support.push import DeviceKeys
from .support.stack import password_of


def make_admin(engine: Engine, name: str) -> None:
    with Session(engine) as session:
        store_admin.set_admin(session, name, True)
        session.commit()


async def test_an_admin_lists_disables_revokes_and_sees_devices(
    client: httpx.AsyncClient, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    add_users(engine, "root", "alice", "albert", "bob")
    make_admin(engine, "root")
    set_device(engine, "alice", "phone", online=True, seen=at(0))
    root = await as_user(client, "root")
    alice_token = await sign_in(client, "alice")

    listed = await root.json("/v1/admin/users", q="al")
    assert [(u["username"], u["admin"], u["disabled"]) for u in listed] == [
        ("albert", False, False),
        ("alice", False, False),
    ]
    page = await root.json("/v1/admin/users", limit=2)
    assert [u["username"] for u in page] == ["albert", "alice"]
    rest = await root.json("/v1/admin/users", after="alice")
    assert [(u["username"], u["admin"]) for u in rest] == [("bob", False), ("root", True)]

    devices = await root.json("/v1/admin/users/alice/devices")
    assert [(d["device"], d["online"]) for d in devices["devices"]] == [("phone", True)]
    assert devices["push_registrations"] == []
    keys = DeviceKeys.new().subscription_keys()
    with Session(engine) as session, session.begin():
        push.subscribe(
            session,
            "alice",
            "phone",
            "webpush",
            "https://push.example.net/w/secret-path",
            keys["p256dh"],
            keys["auth"],
        )
    devices = await root.json("/v1/admin/users/alice/devices")
    registered = [
        (r["device"], r["channel"], r["push_service"]) for r in devices["push_registrations"]
    ]
    assert registered == [("phone", "webpush", "push.example.net")]
    assert "secret-path" not in str(devices), "the endpoint is a capability: host only"

    stats = await root.json("/v1/admin/stats")
    assert (stats["users"], stats["admins"], stats["devices_online"]) == (4, 1, 1)

    with caplog.at_level(logging.INFO, logger="mqchat.admin"):
        revoked = await client.post("/v1/admin/users/alice/revoke", headers=root.headers)
        assert revoked.json() == {"username": "alice", "tokens_revoked": 1}
        gone = await client.get(
            "/v1/conversations", headers={"Authorization": f"Bearer {alice_token}"}
        )
        assert gone.status_code == 401

        disabled = await client.post("/v1/admin/users/bob/disable", headers=root.headers)
        assert (disabled.status_code, disabled.json()["disabled"]) == (200, True)
        assert (
            await client.post(
                "/v1/tokens", data={"username": "bob", "password": password_of("bob")}
            )
        ).status_code == 401
        enabled = await client.post("/v1/admin/users/bob/enable", headers=root.headers)
        assert enabled.json()["disabled"] is False
        assert await sign_in(client, "bob")
    assert [r.getMessage() for r in caplog.records if r.name == "mqchat.admin"] == [
        "admin root revoked 1 tokens of alice",
        "admin root disabled bob",
        "admin root enabled bob",
    ]

    unknown = await client.post("/v1/admin/users/nobody/disable", headers=root.headers)
    assert error_of(unknown) == (404, "unknown_user")


async def test_the_role_goes_with_the_account(client: httpx.AsyncClient, engine: Engine) -> None:
    """A disabled admin is no admin; the role taken back holds at once."""
    add_users(engine, "root", "alice")
    make_admin(engine, "root")
    root = await as_user(client, "root")
    assert (await root.get("/v1/admin/stats")).status_code == 200
    with Session(engine) as session:
        store_admin.set_admin(session, "root", False)
        session.commit()
    assert error_of(await root.get("/v1/admin/stats")) == (403, "forbidden")
