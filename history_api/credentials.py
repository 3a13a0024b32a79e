"""``POST /v1/mqtt-credentials``: a short-lived MQTT password for one device.

A page in a browser signs in over HTTP (``POST /v1/tokens``) and keeps only the
bearer token; the broker gets this credential instead of the account password. It
is bound to the user and the device's client id, expires after
``MQCHAT_API_MQTT_CREDENTIAL_TTL``, and dies with the account's tokens
(``core.credentials``). Without ``MQCHAT_API_MQTT_CREDENTIAL_SECRET`` the route does
not exist (404 ``unknown_route``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from core import credentials
from protocol import errors
from protocol.models import DeviceName
from store import tokens

from .deps import CurrentUser, SessionDep, SettingsDep
from .errors import INVALID_JSON, UNAUTHENTICATED, UNAVAILABLE, ErrorResponse

router = APIRouter(prefix="/v1/mqtt-credentials", tags=["tokens"])


class CredentialRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"device": "phone"}]})

    #: The device's name, as in ``up/ack`` and ``up/presence``: its client id is
    #: ``<username>:<device>``.
    device: Annotated[
        DeviceName,
        # The NUL rule in the schema too, for generated clients and fuzzers (schemathesis
        # drops TEXT_PATTERN's surrogate range and then generated NULs).
        Field(
            description="1-64 characters, no NUL",
            json_schema_extra={"pattern": "^[^\\u0000]*$"},
        ),
    ]

    @field_validator("device")
    @classmethod
    def _no_nul(cls, device: str) -> str:
        if "\x00" in device:
            raise ValueError("a device name cannot contain NUL")
        return device


class CredentialPublic(BaseModel):
    """Connect to MQTT with exactly these: username, client id, password."""

    username: str
    client_id: str
    password: str
    #: When the broker stops accepting ``password`` for a new connection (one already
    #: made stays up). Fetch a new credential for every (re)connect.
    expires_at: datetime


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        400: INVALID_JSON,
        401: UNAUTHENTICATED,
        422: {"model": ErrorResponse, "description": "`invalid_payload`: no valid `device`"},
        503: UNAVAILABLE,
    },
)
async def create_mqtt_credential(
    body: CredentialRequest,
    me: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
) -> CredentialPublic:
    """A password for MQTT, valid for one client id (``<username>:<device>``) for
    ``MQCHAT_API_MQTT_CREDENTIAL_TTL`` (15 minutes by default); revoked with the
    account's tokens (password change, disable)."""
    secret = settings.mqtt_credential_secret
    assert secret is not None  # the route exists only with a key (create_app)
    generation = await run_in_threadpool(tokens.generation, session, me)
    if generation is None:  # disabled since the token was checked
        raise errors.ProtocolError(errors.UNAUTHORIZED, "the account is disabled")
    client_id = f"{me}:{body.device}"
    issued = credentials.issue(
        secret.get_secret_value().encode(), me, client_id, generation, settings.mqtt_credential_ttl
    )
    # Like a token (RFC 6749 5.1): never cached.
    response.headers["Cache-Control"] = "no-store"
    return CredentialPublic(
        username=me, client_id=client_id, password=issued.password, expires_at=issued.expires_at
    )
