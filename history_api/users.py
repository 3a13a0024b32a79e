"""``/v1/users``: creating accounts, changing one's password; a user's presence."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.concurrency import run_in_threadpool

from core.accounts import change_password, register
from protocol import errors
from store import accounts, history, presence
from store.accounts import MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS

from .deps import (
    ClientAddress,
    CurrentToken,
    CurrentUser,
    EngineDep,
    ProvisionerDep,
    SessionDep,
    SettingsDep,
    SignInGuardDep,
)
from .errors import (
    INVALID_JSON,
    THROTTLED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    ErrorResponse,
    not_found,
    storable,
)

router = APIRouter(prefix="/v1/users", tags=["users"])


class UserCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"username": "alice", "password": "correct horse"}]}
    )

    #: Checked by the store, not here, so a bad name gets ``invalid_username`` rather
    #: than the generic ``invalid_payload``. The schema states the rule for the names
    #: in ASCII (schemathesis found a document that allowed any string); any spelling
    #: that normalises to such a name is accepted too (``Alice`` becomes ``alice``).
    username: Annotated[
        str,
        Field(
            json_schema_extra={
                "pattern": "^[A-Za-z0-9][A-Za-z0-9_.]{1,31}$",
                "minLength": 2,
                "maxLength": 32,
            }
        ),
    ]
    password: Annotated[
        SecretStr,
        Field(
            description=f"{MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters, not only "
            "spaces, not the username, not one of the most common passwords",
            json_schema_extra={"minLength": MIN_PASSWORD_CHARS, "maxLength": MAX_PASSWORD_CHARS},
        ),
    ]


class UserPublic(BaseModel):
    #: The normal form of the name asked for: what to sign in with on MQTT.
    username: str


class PasswordChange(BaseModel):
    current_password: SecretStr
    new_password: SecretStr


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        400: INVALID_JSON,
        409: {"model": ErrorResponse, "description": "`username_taken`"},
        422: {
            "model": ErrorResponse,
            "description": "`invalid_username`, `weak_password` or `invalid_payload`",
        },
        503: UNAVAILABLE,
    },
)
async def create_user(
    body: UserCreate, engine: EngineDep, open_provisioner: ProvisionerDep, settings: SettingsDep
) -> UserPublic:
    """Create an account that can sign in to the MQTT broker as soon as this answers.

    The name is normalised first (NFKC, then case folding: ``Alice`` and fullwidth
    letters become ``alice``); the answer carries the normal form, which is the name
    on MQTT. A name taken in any spelling is ``username_taken``.
    """
    password = body.password.get_secret_value()
    # Refuse bad input before opening a connection to the broker for nothing;
    # register() checks again, inside its transaction.
    username = accounts.normalize_username(body.username)
    if settings.broker_auth_secret is not None and "." in username:
        # On RabbitMQ a "." splits a topic level: see history_api/broker_auth.py.
        raise errors.ProtocolError(
            errors.INVALID_USERNAME, "usernames cannot contain '.' on this server"
        )
    accounts.check_password(password, username=username)
    async with open_provisioner() as provisioner:
        await register(engine, provisioner, username, password)
    return UserPublic(username=username)


@router.post(
    "/me/password",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        400: INVALID_JSON,
        401: UNAUTHENTICATED,
        403: {"model": ErrorResponse, "description": "`wrong_password`: the current password"},
        422: {"model": ErrorResponse, "description": "`weak_password` or `invalid_payload`"},
        429: THROTTLED,
        503: UNAVAILABLE,
    },
)
async def change_my_password(
    body: PasswordChange,
    me: CurrentUser,
    token: CurrentToken,
    reading: SessionDep,
    engine: EngineDep,
    open_provisioner: ProvisionerDep,
    guard: SignInGuardDep,
    source: ClientAddress,
) -> None:
    """Change the caller's password; the current one is required.

    The new password works, and the old one stops working, on the MQTT broker as soon
    as this answers. Connections made with the old password are dropped; every bearer
    token of the account but the one making this request is revoked. A wrong current
    password counts as a failed sign-in (see ``POST /v1/tokens``).
    """
    new_password = body.new_password.get_secret_value()
    accounts.check_password(new_password, username=me)
    # The token was looked up in a transaction that, on SQLite, holds the write lock
    # (BEGIN IMMEDIATE); end it before this request writes on a session of its own.
    await run_in_threadpool(reading.rollback)
    guard.check(me, source)
    if not await guard.verify(engine, me, body.current_password.get_secret_value()):
        guard.failed(me, source)
        raise errors.ProtocolError(errors.WRONG_PASSWORD, "the current password is wrong")
    async with open_provisioner() as provisioner:
        await change_password(engine, provisioner, me, new_password, keep_token=token)


class PresencePublic(BaseModel):
    """A contact's presence in the words of MQTT's ``down/presence``: ``username``,
    ``state`` and ``at``. ``online`` and ``last_seen`` were this answer's first words;
    they stay, deprecated, because v1 changes the meaning of nothing it listed."""

    username: str
    #: ``online`` while any of the user's devices is, as on MQTT.
    state: Literal["online", "offline"]
    #: The latest time one of the user's devices was seen: for ``offline``, when the
    #: user was last seen (as on MQTT); for ``online``, their latest announcement
    #: (MQTT's ``at`` is when they came online, so it can be earlier). Null if no
    #: device of theirs was ever seen.
    at: datetime | None
    online: Annotated[
        bool,
        Field(
            description="Deprecated: `state` == `online`.",
            json_schema_extra={"deprecated": True},
        ),
    ]
    last_seen: Annotated[
        datetime | None,
        Field(description="Deprecated: the same as `at`.", json_schema_extra={"deprecated": True}),
    ]


@router.get(
    "/{username}/presence",
    responses={401: UNAUTHENTICATED, 404: not_found(errors.UNKNOWN_USER), 503: UNAVAILABLE},
)
def get_presence(
    username: str, session: SessionDep, me: CurrentUser, settings: SettingsDep
) -> PresencePublic:
    """Whether a user is online, for the users who share a conversation with them (and
    themself), as MQTT's ``down/presence`` tells them. Anyone else gets the answer of a
    name with no account, so nobody can follow or probe a stranger."""
    found = history.presence(session, username) if storable(username) else None
    if found is None or not presence.is_contact(
        session, me, username, settings.presence_group_limit
    ):
        raise errors.ProtocolError(errors.UNKNOWN_USER, f"no user {username!r}")
    return PresencePublic(
        username=found.username,
        state="online" if found.online else "offline",
        at=found.last_seen,
        online=found.online,
        last_seen=found.last_seen,
    )
