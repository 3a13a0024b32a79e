"""``POST /v1/tokens``: the OAuth2 password flow, trading a password for a bearer token.

The body is the standard form (``application/x-www-form-urlencoded``: ``username``,
``password``, optionally ``grant_type=password``), as Swagger UI's "Authorize" and
every OAuth2 client send it. It is parsed here rather than with FastAPI's
``OAuth2PasswordRequestForm``, which needs the ``python-multipart`` package for a
form that never carries files.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Final, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, SecretStr, ValidationError
from sqlalchemy import Engine
from sqlmodel import Session

from protocol import errors
from store import accounts, tokens
from store.db import relaxed

from .deps import (
    TOKEN_URL,
    ClientAddress,
    EngineDep,
    ReadingEngineDep,
    SettingsDep,
    SignInGuardDep,
)
from .errors import THROTTLED, UNAVAILABLE, ErrorResponse

router = APIRouter(prefix=TOKEN_URL, tags=["tokens"])

FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"
#: Room for a 1024-character password, percent-encoded, and the other fields.
MAX_FORM_BYTES: Final = 16 * 1024
MAX_FORM_FIELDS: Final = 16


class PasswordForm(BaseModel):
    """The fields of RFC 6749's password grant that mqchat reads; others are ignored."""

    grant_type: Literal["password"] | None = None
    username: str
    password: SecretStr


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the OAuth2 scheme name)
    #: Seconds from now until the token stops working.
    expires_in: int


async def read_password_form(request: Request) -> PasswordForm:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM_CONTENT_TYPE:
        raise errors.ProtocolError(
            errors.INVALID_PAYLOAD,
            f"send the credentials as {FORM_CONTENT_TYPE}: username=...&password=...",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise errors.ProtocolError(
                errors.PAYLOAD_TOO_LARGE, f"the form is over {MAX_FORM_BYTES} bytes"
            )
    try:
        fields = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError:
        raise errors.ProtocolError(errors.INVALID_UTF8, "the form is not UTF-8") from None
    except ValueError:
        raise errors.ProtocolError(
            errors.INVALID_PAYLOAD, f"the form has over {MAX_FORM_FIELDS} fields"
        ) from None
    try:
        return PasswordForm.model_validate(dict(fields))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def canonical_username(username: str) -> str | None:
    """The normal form people may type any spelling of; None if there is none."""
    try:
        return accounts.normalize_username(username)
    except errors.ProtocolError:
        return None


def sign_in(
    engine: Engine, reading_engine: Engine, username: str, password: str, ttl: timedelta
) -> tokens.IssuedToken | None:
    """Verify the password and issue a token; None for wrong credentials. Blocking.

    ``username`` is the normal form (:func:`canonical_username`). The check reads
    without a lock (``reading_engine``); only the token's write takes SQLite's write
    lock, for one short transaction without a disk flush (:func:`store.db.relaxed`).
    A token issued to an account disabled meanwhile is refused where it is used
    (:func:`store.tokens.resolve`).
    """
    with Session(reading_engine) as session:
        if not accounts.verify(session, username, password):
            return None
    with Session(relaxed(engine)) as session:
        issued = tokens.issue(session, username, ttl)
        session.commit()
        return issued


@router.post(
    "",
    responses={
        401: {"model": ErrorResponse, "description": "`unauthorized`: wrong username or password"},
        413: {"model": ErrorResponse, "description": "`payload_too_large`"},
        422: {"model": ErrorResponse, "description": "`invalid_payload`: not the password form"},
        429: THROTTLED,
        503: UNAVAILABLE,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {FORM_CONTENT_TYPE: {"schema": PasswordForm.model_json_schema()}},
        }
    },
)
async def create_token(
    request: Request,
    response: Response,
    engine: EngineDep,
    reading_engine: ReadingEngineDep,
    settings: SettingsDep,
    guard: SignInGuardDep,
    source: ClientAddress,
) -> TokenResponse:
    """Sign in: a bearer token for the other endpoints, valid for ``expires_in`` seconds.

    The username may be given in any spelling that normalises to it (``Alice``).
    After too many failures for the account or from the address, or too many
    sign-ins of the account, 429 ``rate_limited`` with ``Retry-After``, even for the
    right password.
    """
    form = await read_password_form(request)
    username = canonical_username(form.username)
    guard.check(username, source)
    issued = None
    if username is not None:
        # argon2 is slow on purpose: keep it, and the database, off the event loop.
        issued = await guard.run(
            partial(
                sign_in,
                engine,
                reading_engine,
                username,
                form.password.get_secret_value(),
                settings.token_ttl,
            )
        )
    if issued is None:
        guard.failed(username, source)
        raise errors.ProtocolError(errors.UNAUTHORIZED, "wrong username or password")
    assert username is not None  # issued only for a name in its normal form
    guard.succeeded(username)
    # RFC 6749 5.1: responses carrying tokens must not be cached.
    response.headers["Cache-Control"] = "no-store"
    return TokenResponse(
        access_token=issued.token,
        expires_in=int(settings.token_ttl.total_seconds()),
    )
