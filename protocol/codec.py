"""Bytes on the wire to models and back, with a stable error code for every refusal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from . import errors, topics
from .models import (
    MAX_BODY_CHARS,
    MAX_GROUP_NAME_CHARS,
    MAX_ID_CHARS,
    MAX_PAYLOAD_BYTES,
    UPLINK_MODELS,
    UpAck,
    UpGroup,
    UpMessage,
    UpPresence,
    UpTyping,
)

Uplink = UpMessage | UpAck | UpTyping | UpPresence | UpGroup


@dataclass(frozen=True, slots=True)
class Decoded:
    """An uplink that passed every check: who sent it (from the topic) and what."""

    sender: str
    payload: Uplink


def decode(
    topic: str,
    payload: bytes,
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_body_chars: int = MAX_BODY_CHARS,
) -> Decoded:
    """Decode one uplink publish.

    The sender is taken from the topic, never from the payload: the broker's ACL
    has already proved the topic belongs to the connected user.

    Raises:
        ProtocolError: with the code that tells the sender what to fix.
    """
    parsed = topics.parse_user_topic(topic)
    if parsed is None or parsed.direction != "up":
        raise errors.ProtocolError(errors.UNKNOWN_TOPIC, f"not an uplink topic: {topic!r}")
    model = UPLINK_MODELS.get(parsed.kind)
    if model is None:
        raise errors.ProtocolError(
            errors.UNKNOWN_TOPIC,
            f"unknown uplink kind {parsed.kind!r}; expected one of {sorted(UPLINK_MODELS)}",
        )
    if len(payload) > max_payload_bytes:
        raise errors.ProtocolError(
            errors.PAYLOAD_TOO_LARGE,
            f"payload is {len(payload)} bytes; the limit is {max_payload_bytes}",
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.ProtocolError(
            errors.INVALID_UTF8, f"payload is not UTF-8 (byte {exc.start})"
        ) from None
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.ProtocolError(errors.INVALID_JSON, f"payload is not JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        # Found by fuzzing: ``[[[[...`` nested a few thousand deep exhausts the
        # parser's recursion limit, and an integer over 4,300 digits exceeds Python's
        # int-from-string limit; neither is a JSONDecodeError.
        raise errors.ProtocolError(
            errors.INVALID_JSON, f"payload is not JSON we can read: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise errors.ProtocolError(errors.INVALID_PAYLOAD, "payload must be a JSON object")
    client_id = _echoable_id(data.get("id"))
    # Only where ``body`` is a field: elsewhere it is an unknown field, ignored like any
    # other (found by the contract test: an ack with a long "body" was refused).
    body = data.get("body") if "body" in model.model_fields else None
    if isinstance(body, str) and len(body) > max_body_chars:
        raise errors.ProtocolError(
            errors.BODY_TOO_LARGE,
            f"body is {len(body)} characters; the limit is {max_body_chars}",
            id=client_id,
        )
    name = data.get("name") if model is UpGroup else None
    if isinstance(name, str):
        check_group_name(name, client_id)
    try:
        message = model.model_validate(data)
    except ValidationError as exc:
        raise errors.ProtocolError(errors.INVALID_PAYLOAD, _describe(exc), id=client_id) from None
    assert isinstance(message, UpMessage | UpAck | UpTyping | UpPresence | UpGroup)
    return Decoded(sender=parsed.user, payload=message)


def check_group_name(name: str, client_id: str | None = None) -> None:
    """Refuse a group name that is blank or too long with ``invalid_name``.

    Its own code rather than ``invalid_payload``: the name is what a person typed, and
    a client shows this refusal to them.
    """
    if not name.strip():
        raise errors.ProtocolError(
            errors.INVALID_NAME, "a group name may not be blank", id=client_id
        )
    if len(name) > MAX_GROUP_NAME_CHARS:
        raise errors.ProtocolError(
            errors.INVALID_NAME,
            f"the group name is {len(name)} characters; the limit is {MAX_GROUP_NAME_CHARS}",
            id=client_id,
        )


def encode(model: BaseModel) -> bytes:
    """Serialise a payload model as compact UTF-8 JSON, using wire names (``from``)."""
    return model.model_dump_json(by_alias=True, exclude_none=True).encode()


def _echoable_id(value: object) -> str | None:
    """The payload's ``id`` if a refusal can send it back, else None.

    Found by fuzzing: an id with a lone surrogate (``"\\ud800"``, valid JSON) made the
    error payload itself unencodable, and the exception killed the bridge; the
    redelivered uplink then killed it again on every restart.
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS or "\x00" in value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
