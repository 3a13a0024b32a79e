"""``/v1/users``: creating accounts; a user's presence."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from broker.provisioning import register
from protocol import errors, topics
from store import accounts, history
from store.accounts import MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS

from .deps import CurrentUser, EngineDep, ProvisionerDep, SessionDep
from .errors import UNAUTHENTICATED, UNAVAILABLE, ErrorResponse, not_found, storable

router = APIRouter(prefix="/v1/users", tags=["users"])


class UserCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"username": "alice", "password": "correct horse"}]}
    )

    #: Checked by the store, not here, so a bad name gets ``invalid_username`` rather
    #: than the generic ``invalid_payload``; the rules are only documented here (found
    #: by schemathesis: the document allowed any string, the API refused most).
    username: Annotated[
        str,
        Field(
            json_schema_extra={
                "pattern": topics.USERNAME_RE.pattern,
                "minLength": 2,
                "maxLength": 32,
            }
        ),
    ]
    password: Annotated[
        SecretStr,
        Field(
            description=f"{MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters",
            json_schema_extra={"minLength": MIN_PASSWORD_CHARS, "maxLength": MAX_PASSWORD_CHARS},
        ),
    ]


class UserPublic(BaseModel):
    username: str


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        400: {"model": ErrorResponse, "description": "`invalid_json`: the body is not JSON"},
        409: {"model": ErrorResponse, "description": "`username_taken`"},
        422: {
            "model": ErrorResponse,
            "description": "`invalid_username`, `weak_password` or `invalid_payload`",
        },
        503: UNAVAILABLE,
    },
)
async def create_user(
    body: UserCreate, engine: EngineDep, open_provisioner: ProvisionerDep
) -> UserPublic:
    """Create an account that can sign in to the MQTT broker as soon as this answers."""
    password = body.password.get_secret_value()
    # Refuse bad input before opening a connection to the broker for nothing;
    # register() checks again, inside its transaction.
    accounts.check_username(body.username)
    accounts.check_password(password)
    async with open_provisioner() as provisioner:
        await register(engine, provisioner, body.username, password)
    return UserPublic(username=body.username)


class PresencePublic(BaseModel):
    username: str
    #: Whether any of the user's devices is connected.
    online: bool
    #: The latest time any of the user's devices was seen; null if none ever was.
    last_seen: datetime | None


@router.get(
    "/{username}/presence",
    responses={401: UNAUTHENTICATED, 404: not_found(errors.UNKNOWN_USER), 503: UNAVAILABLE},
)
def get_presence(username: str, session: SessionDep, me: CurrentUser) -> PresencePublic:
    """Whether a user is online, for any signed-in user (as ``chat/v1/presence/+`` is)."""
    found = history.presence(session, username) if storable(username) else None
    if found is None:
        raise errors.ProtocolError(errors.UNKNOWN_USER, f"no user {username!r}")
    return PresencePublic(username=found.username, online=found.online, last_seen=found.last_seen)
