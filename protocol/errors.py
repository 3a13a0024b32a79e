"""Stable error codes shared by MQTT ``down/error`` payloads and HTTP responses.

Exception tree::

    ProtocolError            an uplink or request that the contract rejects
                             (carries .code, .detail and, where known, .id)

Codes never change meaning within protocol v1; clients switch on them.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

INVALID_UTF8: Final = "invalid_utf8"
INVALID_JSON: Final = "invalid_json"
INVALID_PAYLOAD: Final = "invalid_payload"
PAYLOAD_TOO_LARGE: Final = "payload_too_large"
BODY_TOO_LARGE: Final = "body_too_large"
UNKNOWN_TOPIC: Final = "unknown_topic"
ID_REUSED: Final = "id_reused"
UNKNOWN_RECIPIENT: Final = "unknown_recipient"
UNKNOWN_CONVERSATION: Final = "unknown_conversation"
UNKNOWN_MESSAGE: Final = "unknown_message"
UNKNOWN_USER: Final = "unknown_user"
UNKNOWN_ROUTE: Final = "unknown_route"
METHOD_NOT_ALLOWED: Final = "method_not_allowed"
INVALID_USERNAME: Final = "invalid_username"
USERNAME_TAKEN: Final = "username_taken"
WEAK_PASSWORD: Final = "weak_password"
WRONG_PASSWORD: Final = "wrong_password"
UNAUTHORIZED: Final = "unauthorized"
NOT_SUPPORTED: Final = "not_supported"
RATE_LIMITED: Final = "rate_limited"
TOO_MANY_DEVICES: Final = "too_many_devices"
FORBIDDEN: Final = "forbidden"
ALREADY_MEMBER: Final = "already_member"
NOT_MEMBER: Final = "not_member"
ALREADY_ADMIN: Final = "already_admin"
NOT_ADMIN: Final = "not_admin"
LAST_ADMIN: Final = "last_admin"
GROUP_FULL: Final = "group_full"
INVALID_NAME: Final = "invalid_name"
INTERNAL: Final = "internal_error"

#: Every code a client may see, with the HTTP status it maps to where the
#: HTTP API reports it. One table, so MQTT and HTTP never disagree.
HTTP_STATUS: Final[dict[str, int]] = {
    INVALID_UTF8: 400,
    INVALID_JSON: 400,
    INVALID_PAYLOAD: 422,
    PAYLOAD_TOO_LARGE: 413,
    BODY_TOO_LARGE: 413,
    UNKNOWN_TOPIC: 404,
    ID_REUSED: 409,
    UNKNOWN_RECIPIENT: 404,
    UNKNOWN_CONVERSATION: 404,
    UNKNOWN_MESSAGE: 404,
    UNKNOWN_USER: 404,
    UNKNOWN_ROUTE: 404,
    METHOD_NOT_ALLOWED: 405,
    INVALID_USERNAME: 422,
    USERNAME_TAKEN: 409,
    WEAK_PASSWORD: 422,
    WRONG_PASSWORD: 403,
    UNAUTHORIZED: 401,
    NOT_SUPPORTED: 400,
    RATE_LIMITED: 429,
    TOO_MANY_DEVICES: 409,
    FORBIDDEN: 403,
    ALREADY_MEMBER: 409,
    NOT_MEMBER: 409,
    ALREADY_ADMIN: 409,
    NOT_ADMIN: 409,
    LAST_ADMIN: 409,
    GROUP_FULL: 409,
    INVALID_NAME: 422,
    INTERNAL: 500,
}

ERROR_CODES: Final[frozenset[str]] = frozenset(HTTP_STATUS)

#: The same codes as a type, so payload schemas list them as an enum.
ErrorCode = Literal[
    "invalid_utf8",
    "invalid_json",
    "invalid_payload",
    "payload_too_large",
    "body_too_large",
    "unknown_topic",
    "id_reused",
    "unknown_recipient",
    "unknown_conversation",
    "unknown_message",
    "unknown_user",
    "unknown_route",
    "method_not_allowed",
    "invalid_username",
    "username_taken",
    "weak_password",
    "wrong_password",
    "unauthorized",
    "not_supported",
    "rate_limited",
    "too_many_devices",
    "forbidden",
    "already_member",
    "not_member",
    "already_admin",
    "not_admin",
    "last_admin",
    "group_full",
    "invalid_name",
    "internal_error",
]
assert set(get_args(ErrorCode)) == ERROR_CODES


class ProtocolError(Exception):
    """A payload, topic or request that protocol v1 rejects.

    Attributes:
        code: one of :data:`ERROR_CODES`.
        detail: a human-readable explanation, safe to show the offender.
        id: the client message id of the offending uplink, where it could be read.
    """

    def __init__(self, code: str, detail: str, *, id: str | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.id = id
