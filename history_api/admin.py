"""``/v1/admin``: an operator's view of accounts, for accounts with the admin role.

The role is granted by ``mqchat user admin NAME`` only: no route here (or anywhere)
sets it, so an account cannot promote itself. Everyone else gets 403 ``forbidden``
on every route, whatever the object named (``tests/test_bola.py``). Every change is
logged with the admin who made it, on the ``mqchat.admin`` logger, one line each.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from core.accounts import revoke_tokens as revoke_everywhere
from core.accounts import set_disabled
from protocol import errors
from store import admin as store_admin
from store import push

from .deps import CurrentUser, EngineDep, ProvisionerDep, SessionDep
from .errors import UNAUTHENTICATED, UNAVAILABLE, ErrorResponse, not_found

log = logging.getLogger("mqchat.admin")

FORBIDDEN = {"model": ErrorResponse, "description": "`forbidden`: not an admin"}
RESPONSES: dict[int | str, dict[str, object]] = {
    401: UNAUTHENTICATED,
    403: FORBIDDEN,
    503: UNAVAILABLE,
}
UNKNOWN_USER: dict[int | str, dict[str, Any]] = {404: not_found(errors.UNKNOWN_USER)}


def require_admin(me: CurrentUser, session: SessionDep) -> str:
    """The caller, if an enabled account with the admin role.

    Raises:
        ProtocolError: ``forbidden`` (403) for anyone else.
    """
    if not store_admin.is_admin(session, me):
        raise errors.ProtocolError(errors.FORBIDDEN, "admin routes are for admins")
    return me


Admin = Annotated[str, Depends(require_admin)]

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=RESPONSES)


class AdminUser(BaseModel):
    username: str
    disabled: bool
    deleted: bool
    admin: bool
    created_at: datetime


class AdminDevice(BaseModel):
    device: str
    online: bool
    last_seen: datetime


class AdminPushRegistration(BaseModel):
    device: str
    channel: str
    #: The push service's host only: the endpoint's full URL is a capability to wake
    #: the device up, which an admin has no use for.
    push_service: str
    created_at: datetime


class UserDevices(BaseModel):
    username: str
    devices: list[AdminDevice]
    push_registrations: list[AdminPushRegistration]


class Revoked(BaseModel):
    username: str
    tokens_revoked: int


@router.get("/users")
def list_users(
    admin: Admin,
    session: SessionDep,
    q: Annotated[str, Query(max_length=32, description="a name prefix")] = "",
    after: Annotated[str, Query(max_length=32, description="the last name of a page")] = "",
    limit: Annotated[int, Query(ge=1, le=store_admin.PAGE_LIMIT)] = 50,
) -> list[AdminUser]:
    """Accounts by name, whose name starts with ``q``; page on with ``after``."""
    rows = store_admin.users(session, q.casefold(), limit, after)
    return [AdminUser(**asdict(row)) for row in rows]


@router.get("/users/{username}/devices", responses=UNKNOWN_USER)
def user_devices(username: str, admin: Admin, session: SessionDep) -> UserDevices:
    """A user's devices (presence) and push registrations."""
    devices = store_admin.devices(session, username)
    return UserDevices(
        username=username,
        devices=[
            AdminDevice(device=d.device, online=d.online, last_seen=d.last_seen) for d in devices
        ],
        push_registrations=[
            AdminPushRegistration(
                device=s.device,
                channel=s.channel,
                push_service=urlsplit(s.endpoint).hostname or "",
                created_at=s.created_at,
            )
            for s in push.subscriptions(session, username)
        ],
    )


@router.post("/users/{username}/disable", responses=UNKNOWN_USER)
async def disable_user(
    username: str, admin: Admin, engine: EngineDep, open_provisioner: ProvisionerDep
) -> AdminUser:
    """Disable an account: its connections dropped, its tokens revoked."""
    return await _set_disabled(username, admin, engine, open_provisioner, disabled=True)


@router.post("/users/{username}/enable", responses=UNKNOWN_USER)
async def enable_user(
    username: str, admin: Admin, engine: EngineDep, open_provisioner: ProvisionerDep
) -> AdminUser:
    """Let a disabled account sign in again (its old tokens stay revoked)."""
    return await _set_disabled(username, admin, engine, open_provisioner, disabled=False)


@router.post("/users/{username}/revoke", responses=UNKNOWN_USER)
async def revoke_tokens(
    username: str, admin: Admin, engine: EngineDep, open_provisioner: ProvisionerDep
) -> Revoked:
    """Sign a user out everywhere: every bearer token and MQTT credential revoked, and
    the connections made with a credential dropped. The password keeps working."""
    async with open_provisioner() as provisioner:
        revoked = await revoke_everywhere(engine, provisioner, username)
    log.info("admin %s revoked %d tokens of %s", admin, revoked, username)
    return Revoked(username=username, tokens_revoked=revoked)


@router.get("/stats")
def server_stats(admin: Admin, session: SessionDep) -> store_admin.ServerStats:
    """Counts of accounts, conversations, messages and devices online."""
    return store_admin.stats(session)


async def _set_disabled(
    username: str,
    admin: str,
    engine: EngineDep,
    open_provisioner: ProvisionerDep,
    *,
    disabled: bool,
) -> AdminUser:
    async with open_provisioner() as provisioner:
        await set_disabled(engine, provisioner, username, disabled=disabled)
    log.info("admin %s %s %s", admin, "disabled" if disabled else "enabled", username)

    def read() -> AdminUser:
        with Session(engine) as session:
            row = store_admin.users(session, username, 1)[0]
        return AdminUser(**asdict(row))

    return await run_in_threadpool(read)
