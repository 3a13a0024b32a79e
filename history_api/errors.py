"""Every error the API reports, turned into a response here and nowhere else.

::

    ProtocolError            -> HTTP_STATUS[code]   (invalid_username 422, username_taken 409, ...;
                                                     unauthorized 401 adds WWW-Authenticate: Bearer)
      Throttled              -> 429 rate_limited     (with Retry-After: seconds)
    signin.Busy              -> 429 rate_limited     (too many password hashes at once; Retry-After)
    RequestValidationError   -> 422 invalid_payload  (malformed JSON, missing or mistyped fields)
    HTTPException 400        -> 400 invalid_json     (a body FastAPI cannot parse: not UTF-8)
    HTTPException 404        -> 404 unknown_route    (no such path)
    HTTPException 405        -> 405 method_not_allowed (with Allow: the path's methods)
    HTTPException, others    -> its status, unauthorized / invalid_payload / internal_error
    ProvisioningError        -> 503 internal_error   (mosquitto refused or is unreachable)
    OperationalError         -> 503 internal_error   (the database is unreachable)
    DataError                -> 422 invalid_payload  (a value the database refuses, e.g. NUL)
    any other exception      -> 500 internal_error   (details only in the log)

Every body is ``{"error": {"code": <stable code>, "detail": <text>}}``; clients switch
on ``code``, which means the same here as in an MQTT ``down/error`` payload.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.dynsec import ProvisioningError
from protocol import errors
from protocol.errors import ErrorCode, ProtocolError
from store import signin

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: ErrorCode
    detail: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


#: For ``responses=`` of a route, so the OpenAPI document shows the error shape.
UNAVAILABLE = {"model": ErrorResponse, "description": "The broker or database is unavailable"}
UNAUTHENTICATED = {
    "model": ErrorResponse,
    "description": "`unauthorized`: no bearer token, or one that is unknown or expired",
}


#: For every route that reads a JSON body.
INVALID_JSON = {
    "model": ErrorResponse,
    "description": "`invalid_json`: the body is not JSON (or not UTF-8)",
}

THROTTLED = {
    "model": ErrorResponse,
    "description": "`rate_limited`: too many failed sign-ins for the account or from this "
    "address, or too many sign-ins at once on the server; `Retry-After` says how many "
    "seconds to wait",
    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
}


class Throttled(ProtocolError):
    """``rate_limited``, with the seconds to wait (the ``Retry-After`` header)."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(errors.RATE_LIMITED, detail)
        self.retry_after = retry_after


def storable(*texts: str) -> bool:
    """Whether the database could hold these strings: none holds NUL, which PostgreSQL
    text cannot. Found by fuzzing: a ``%00`` in a path was a 500 on PostgreSQL; a
    route answers such a request as it would for an id that does not exist."""
    return not any("\x00" in text for text in texts)


def not_found(code: str) -> dict[str, object]:
    return {"model": ErrorResponse, "description": f"`{code}`"}


def error_response(
    code: str, detail: str, *, status: int | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, detail=detail))
    headers = dict(headers or {})
    if code == errors.UNAUTHORIZED:
        # RFC 6750: a 401 names the scheme the client should use.
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        body.model_dump(),
        status_code=status if status is not None else errors.HTTP_STATUS[code],
        headers=headers,
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(ProtocolError, _protocol_error)
    app.add_exception_handler(signin.Busy, _busy)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ProvisioningError, _broker_unavailable)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(Exception, _unexpected)


async def _protocol_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProtocolError)
    if isinstance(exc, Throttled):
        return error_response(exc.code, exc.detail, headers={"Retry-After": str(exc.retry_after)})
    return error_response(exc.code, exc.detail)


async def _busy(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, signin.Busy)
    request.app.state.metrics.signin_throttles.labels("busy").inc()
    return error_response(
        errors.RATE_LIMITED, str(exc), status=429, headers={"Retry-After": str(exc.retry_after)}
    )


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(errors.INVALID_PAYLOAD, _describe(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's and FastAPI's own refusals, in our shape with our codes.

    Found by a browser app and by curl: an unknown path or a wrong method answered
    FastAPI's ``{"detail": ...}``, which clients that switch on ``error.code`` cannot
    read.
    """
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 400:
        # FastAPI's own "error parsing the body" (not UTF-8, say), found by schemathesis.
        return error_response(errors.INVALID_JSON, "the body is not UTF-8 JSON")
    if status == 404:
        return error_response(
            errors.UNKNOWN_ROUTE, f"no endpoint {request.url.path!r}; see /openapi.json"
        )
    if status == 405:
        # Starlette names the path's methods in Allow (RFC 9110 requires it on a 405).
        return error_response(
            errors.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.url.path!r}",
            headers=dict(exc.headers or {}),
        )
    code = errors.UNAUTHORIZED if status == 401 else errors.INVALID_PAYLOAD
    if status >= 500:
        code = errors.INTERNAL
    return error_response(code, str(exc.detail), status=status, headers=dict(exc.headers or {}))


async def _broker_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The broker's own words may name service accounts; they go to the log only.
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return error_response(
        errors.INTERNAL, "the MQTT broker is unavailable; try again later", status=503
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: database: %s", request.method, request.url.path, exc)
    return error_response(
        errors.INTERNAL, "the database is unavailable; try again later", status=503
    )


async def _unstorable(request: Request, exc: Exception) -> JSONResponse:
    # A backstop for values the database refuses (NUL, out-of-range numbers) that no
    # route check caught: the client's input, so a 4xx, never a 500.
    log.warning("%s %s: the database refused a value: %s", request.method, request.url.path, exc)
    return error_response(errors.INVALID_PAYLOAD, "a value the database cannot store")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(errors.INTERNAL, "internal error")


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in list(exc.errors())[:5]:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON{': ' + str(reason) if reason else ''}")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
