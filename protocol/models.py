"""Payload models of protocol v1, one per message kind on the wire.

Uplink models (device to bridge) are strict about the fields they name and ignore
any others, so newer clients keep working against older bridges. Downlink models
are what the bridge emits; clients may rely on every field listed in
``docs/protocol.md`` and must ignore fields they do not know.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .errors import ErrorCode

#: Longest message text, in characters. The bridge answers ``body_too_large`` above it.
MAX_BODY_CHARS: Final = 4096
#: Largest uplink payload the bridge reads, in bytes (``payload_too_large`` above it).
#: The production broker drops payloads over twice this, without telling anyone.
MAX_PAYLOAD_BYTES: Final = 32 * 1024
MAX_ID_CHARS: Final = 64
#: Longest group name, in characters (WhatsApp's subject limit); ``invalid_name`` above it.
MAX_GROUP_NAME_CHARS: Final = 100
#: Most users one group operation may name (the default group size cap).
MAX_OP_MEMBERS: Final = 1024

#: What the schemas say of every uplink text: no NUL (``_Uplink._no_nul`` enforces it
#: with a clearer message than a pattern mismatch) and no lone surrogate (``"\ud800"``
#: is valid JSON but no Unicode text; pydantic refuses it).
TEXT_PATTERN: Final = r"^[^\u0000\ud800-\udfff]*$"
_TEXT: Final = {"pattern": TEXT_PATTERN}
#: A group name: text as above with at least one character that is not white space
#: (``codec.check_group_name`` refuses the rest with ``invalid_name``).
GROUP_NAME_PATTERN: Final = (
    r"^[^\u0000\ud800-\udfff]*[^\s\u0000\ud800-\udfff][^\u0000\ud800-\udfff]*$"
)


def _integral(value: object) -> object:
    """``1.0`` as ``1``: JSON has one number type, and JSON Schema calls ``1.0`` an
    integer, so a client whose JSON library writes it must not be refused for it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _absent(value: object) -> bool:
    return value is None


ClientMessageId = Annotated[
    str, Field(min_length=1, max_length=MAX_ID_CHARS, json_schema_extra=_TEXT)
]
ConversationId = Annotated[str, Field(min_length=1, max_length=64, json_schema_extra=_TEXT)]
Username = Annotated[str, Field(min_length=2, max_length=32, pattern=r"^[a-z0-9][a-z0-9_.]{1,31}$")]
Seq = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
DeviceName = Annotated[str, Field(min_length=1, max_length=64, json_schema_extra=_TEXT)]


class _Uplink(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # JSON may carry "\u0000", but PostgreSQL text cannot hold it: a stored body
        # with one would fail its INSERT on every retry and hold up the whole batch.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("text may not contain the NUL character (\\u0000)")
        return value


class _Downlink(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class UpMessage(_Uplink):
    """A new message, published to ``chat/v1/u/{me}/up/msg``.

    ``id`` is chosen by the client and is the idempotency key: the same ``id`` sent
    again by the same user is the same message.
    """

    # Exactly one target, written so that schema validators and code generators see it
    # (a null target counts as absent, as it does here).
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"title": "ToUser", "required": ["to"], "properties": {"to": {"type": "string"}}},
                {
                    "title": "ToConversation",
                    "required": ["conversation"],
                    "properties": {"conversation": {"type": "string"}},
                },
            ]
        }
    )

    id: ClientMessageId
    to: Username | None = None
    conversation: ConversationId | None = None
    body: Annotated[str, Field(min_length=1, max_length=MAX_BODY_CHARS, json_schema_extra=_TEXT)]

    @model_validator(mode="after")
    def _exactly_one_target(self) -> UpMessage:
        if (self.to is None) == (self.conversation is None):
            raise ValueError("give exactly one of 'to' (a username) or 'conversation'")
        return self


class UpAck(_Uplink):
    """A device's cursors in one conversation: everything up to a seq is delivered / read.

    Cursors only move forward: a value at or below the stored one is ignored. ``read``
    implies ``delivered``. ``device`` names the device (its own cursor); stock clients
    that leave it out share the cursor ``default``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {
                    "title": "Delivered",
                    "required": ["delivered"],
                    "properties": {"delivered": {"type": "integer"}},
                },
                {
                    "title": "Read",
                    "required": ["read"],
                    "properties": {"read": {"type": "integer"}},
                },
            ]
        }
    )

    conversation: ConversationId
    delivered: Seq | None = None
    read: Seq | None = None
    device: DeviceName = "default"

    @model_validator(mode="after")
    def _some_cursor(self) -> UpAck:
        if self.delivered is None and self.read is None:
            raise ValueError("give 'delivered', 'read' or both")
        return self


class UpPresence(_Uplink):
    """A device's own presence, on ``chat/v1/u/{me}/up/presence``.

    Devices publish ``online`` when they connect (and again every few minutes, so a
    device whose last will was lost still times out) and set ``offline`` as their
    last will. The bridge turns these into the user's retained presence.
    """

    device: DeviceName
    state: Literal["online", "offline"]


class UpTyping(_Uplink):
    conversation: ConversationId
    typing: bool = True


GroupOp = Literal["create", "add", "remove", "leave", "promote", "demote", "rename"]
GroupEvent = Literal["created", "added", "removed", "left", "promoted", "demoted", "renamed"]
#: The ops that name users in ``members`` (the schema's ``OnMembers`` lists them too).
OPS_ON_MEMBERS: Final[frozenset[str]] = frozenset({"add", "remove", "promote", "demote"})


class UpGroup(_Uplink):
    """A change to a group, published to ``chat/v1/u/{me}/up/group``.

    ``id`` is the idempotency key, shared with ``up/msg`` ids: the change is stored as
    an event of the conversation's timeline, under this id. ``create`` names no
    ``conversation`` (the answer carries the new one) and needs ``name``; every other
    op names the ``conversation``. ``add``, ``remove``, ``promote`` and ``demote`` name
    the users in ``members``; ``rename`` needs ``name``. ``name`` is checked by the
    bridge (``invalid_name``: empty, blank or over 100 characters).
    """

    # What each op needs, written so that schema validators see it (a null
    # ``conversation`` counts as absent, as it does here).
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "title": "Create",
                    "required": ["name"],
                    "properties": {
                        "op": {"const": "create"},
                        "name": {"type": "string"},
                        "conversation": {"type": "null"},
                    },
                },
                {
                    "title": "OnMembers",
                    "required": ["conversation", "members"],
                    "properties": {
                        "op": {"enum": ["add", "demote", "promote", "remove"]},
                        "conversation": {"type": "string"},
                        "members": {"type": "array", "minItems": 1},
                    },
                },
                {
                    "title": "Leave",
                    "required": ["conversation"],
                    "properties": {"op": {"const": "leave"}, "conversation": {"type": "string"}},
                },
                {
                    "title": "Rename",
                    "required": ["conversation", "name"],
                    "properties": {
                        "op": {"const": "rename"},
                        "conversation": {"type": "string"},
                        "name": {"type": "string"},
                    },
                },
            ]
        }
    )

    id: ClientMessageId
    op: GroupOp
    conversation: ConversationId | None = None
    name: (
        Annotated[
            str,
            Field(
                max_length=MAX_GROUP_NAME_CHARS,
                json_schema_extra={"pattern": GROUP_NAME_PATTERN},
            ),
        ]
        | None
    ) = None
    members: Annotated[list[Username], Field(max_length=MAX_OP_MEMBERS)] | None = None

    @model_validator(mode="after")
    def _fields_of_op(self) -> UpGroup:
        if self.op == "create":
            if self.conversation is not None:
                raise ValueError("'create' names no 'conversation': the group is new")
            if self.name is None:
                raise ValueError("'create' needs a 'name'")
            return self
        if self.conversation is None:
            raise ValueError(f"{self.op!r} needs the group's 'conversation'")
        if self.op in OPS_ON_MEMBERS and not self.members:
            raise ValueError(f"{self.op!r} needs 'members': the users it concerns")
        if self.op == "rename" and self.name is None:
            raise ValueError("'rename' needs a 'name'")
        return self


class DownMessage(_Downlink):
    """A stored message, published to every member's ``chat/v1/u/{member}/down/msg``.

    A group's membership changes are events in the same timeline: they take a seq
    like a message and carry ``event``, with ``from`` the member who made the change
    and ``body`` a line a client that does not know events can show as it is
    ("alice added carol"). ``users`` are the users the event concerns (``created``:
    the members besides the creator; ``left``: none), ``name`` the group's name
    (``created``, ``renamed``), ``promoted`` who became admin because the last admin
    left.
    """

    id: str
    conversation: str
    seq: Seq
    from_: str = Field(alias="from")
    body: str
    sent_at: datetime
    # Left out when absent (not null), so a message reads as it did before groups.
    event: GroupEvent | None = Field(default=None, exclude_if=_absent)
    users: list[str] | None = Field(default=None, exclude_if=_absent)
    name: str | None = Field(default=None, exclude_if=_absent)
    promoted: list[str] | None = Field(default=None, exclude_if=_absent)


class Receipt(_Downlink):
    """``sent`` / ``delivered`` / ``read``, on ``chat/v1/u/{member}/down/receipt``.

    ``sent`` goes to the sender's devices; ``delivered`` and ``read`` to the other
    members, and ``read`` to the reader's own devices too (``by`` is the reader).
    ``seq`` is a cursor: ``delivered`` and ``read`` mean "up to and including seq".

    In a group, telling every member of every move would cost 1,023 publishes per
    cursor move; instead a message's sender gets an aggregate: ``seq`` is then that
    one message of theirs, ``members`` how many may read it (the sender aside), and
    ``delivered`` / ``read`` how many of those have it and have read it by now. One
    such receipt per sender and group per bridge batch, however many members moved.
    """

    status: Literal["sent", "delivered", "read"]
    conversation: str
    seq: Seq
    id: str | None = None
    by: str
    at: datetime
    # Left out when absent (not null): a 1:1 receipt reads as it always did.
    delivered: int | None = Field(default=None, ge=0, exclude_if=_absent)
    read: int | None = Field(default=None, ge=0, exclude_if=_absent)
    members: int | None = Field(default=None, ge=0, exclude_if=_absent)


class DownTyping(_Downlink):
    """Someone is (or stopped) typing, on ``chat/v1/u/{member}/down/typing``.

    QoS 0 and never stored: a typing indicator that is lost is simply not shown.
    """

    conversation: str
    from_: str = Field(alias="from")
    typing: bool


class Presence(_Downlink):
    """A user's presence, as the history API's ``GET /v1/users/{name}/presence`` says it.

    ``online`` while any of the user's devices is; ``at`` is since when (for
    ``offline``: when the user was last seen).
    """

    state: Literal["online", "offline"]
    at: datetime


class ContactPresence(_Downlink):
    """One contact's presence inside a ``down/presence``: :class:`Presence` and whose."""

    username: str
    state: Literal["online", "offline"]
    at: datetime


class DownPresence(_Downlink):
    """Contacts' presence, on ``chat/v1/u/{me}/down/presence``.

    Sent only to the users who share a conversation with the user it names (a 1:1,
    or a group small enough to show presence), so nobody can follow a stranger; and
    it is an ordinary queued downlink, not a retained message, so it works the same
    on every broker. ``snapshot``: this is every contact's state as of now (sent
    after a device says ``online``), not only the ones that changed.
    """

    users: list[ContactPresence]
    snapshot: bool = False


class ErrorPayload(_Downlink):
    """An uplink the bridge refused, on ``chat/v1/u/{sender}/down/error``."""

    id: str | None = None
    code: ErrorCode
    detail: str


UPLINK_MODELS: Final[dict[str, type[_Uplink]]] = {
    "msg": UpMessage,
    "ack": UpAck,
    "typing": UpTyping,
    "presence": UpPresence,
    "group": UpGroup,
}

DOWNLINK_MODELS: Final[dict[str, type[_Downlink]]] = {
    "msg": DownMessage,
    "receipt": Receipt,
    "typing": DownTyping,
    "error": ErrorPayload,
    "presence": DownPresence,
}
