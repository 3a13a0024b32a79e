"""``/v1/conversations``: the caller's conversations and their history, paged by seq.

A client fills a gap (it has seq 41 and 45) with ``?after=41&before=45``, catches up
after being offline with ``?after=<newest seq it has>`` until ``has_more`` is false,
and scrolls back with ``?before=<oldest seq it shows>``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from protocol import DownMessage, errors
from store import history

from .deps import CurrentUser, SessionDep
from .errors import UNAUTHENTICATED, UNAVAILABLE, ErrorResponse, not_found, storable

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

DEFAULT_PAGE: Final = 50
MAX_PAGE: Final = 200
#: Seqs are INTEGER columns. Found by schemathesis: ``after=2**64`` reached SQLite as
#: an integer it cannot bind (OverflowError, a 500); now it is a 422.
MAX_SEQ: Final = 2**31 - 1


class LastMessage(BaseModel):
    """The ``down/msg`` fields but ``conversation``, which the summary holding it names."""

    model_config = ConfigDict(populate_by_name=True)

    id: str
    seq: int
    from_: str = Field(alias="from")
    body: str
    sent_at: datetime

    @classmethod
    def of(cls, message: history.HistoryMessage) -> LastMessage:
        # Field by field: through ``message.down()`` it cost five times as much, and a
        # list has up to 200 of these.
        return cls(
            id=message.client_id,
            seq=message.seq,
            from_=message.sender,
            body=message.body,
            sent_at=message.sent_at,
        )


class ConversationPublic(BaseModel):
    id: str
    #: ``direct`` or ``group``.
    kind: str
    #: A group's name; null for a direct conversation.
    name: str | None
    #: The current members; empty when the caller is no longer one.
    members: list[str]
    #: False for a group the caller left or was removed from: its history up to then
    #: stays readable, nothing after.
    member: bool
    #: The newest message or event the caller may read.
    last_message: LastMessage | None
    #: Messages from others after the caller's read cursor (the furthest of their
    #: devices), inside the caller's membership; group events are not counted.
    unread: int


class MemberPublic(BaseModel):
    username: str
    #: ``admin`` or ``member``.
    role: str
    #: The seq the member sees the conversation from: what came before is not theirs.
    since_seq: int


class MessagePage(BaseModel):
    #: Ascending seq, with the field names of the ``down/msg`` payload (group events
    #: with their ``event`` fields).
    messages: list[DownMessage]
    #: More messages lie beyond this page in the direction of paging: after it for
    #: ``after``, before it otherwise.
    has_more: bool


@router.get("", responses={401: UNAUTHENTICATED, 503: UNAVAILABLE})
def list_conversations(session: SessionDep, me: CurrentUser) -> list[ConversationPublic]:
    """The caller's conversations, newest activity first (at most 200)."""
    return [
        ConversationPublic(
            id=summary.id,
            kind=summary.kind,
            name=summary.name,
            members=list(summary.members),
            member=summary.member,
            last_message=None
            if summary.last_message is None
            else LastMessage.of(summary.last_message),
            unread=summary.unread,
        )
        for summary in history.conversations_of(session, me)
    ]


@router.get(
    "/{conversation_id}/members",
    responses={401: UNAUTHENTICATED, 404: not_found(errors.UNKNOWN_CONVERSATION), 503: UNAVAILABLE},
)
def list_members(conversation_id: str, session: SessionDep, me: CurrentUser) -> list[MemberPublic]:
    """A conversation's current members, by name, with their roles and the seq each
    sees it from. Only for its members: a former member gets 404 like a stranger."""
    found = history.members(session, me, conversation_id) if storable(conversation_id) else None
    if found is None:
        raise errors.ProtocolError(
            errors.UNKNOWN_CONVERSATION, f"no conversation {conversation_id!r} of yours"
        )
    return [MemberPublic(username=m.username, role=m.role, since_seq=m.since_seq) for m in found]


@router.get(
    "/{conversation_id}/messages",
    responses={
        401: UNAUTHENTICATED,
        404: not_found(errors.UNKNOWN_CONVERSATION),
        422: {"model": ErrorResponse, "description": "`invalid_payload`: a bad parameter"},
        503: UNAVAILABLE,
    },
)
def list_messages(
    conversation_id: str,
    session: SessionDep,
    me: CurrentUser,
    before: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="Only messages with a lower seq; the newest of them"),
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="Only messages with a higher seq; the oldest of them"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> MessagePage:
    """A page of a conversation's messages in ascending seq.

    Neither ``after`` nor ``before``: the newest page. Both: the range between them,
    paged forwards from ``after``.
    """
    found = (
        history.page(session, me, conversation_id, before=before, after=after, limit=limit)
        if storable(conversation_id)
        else None
    )
    if found is None:
        # Same answer for "no such conversation" and "not yours": ids cannot be probed.
        raise errors.ProtocolError(
            errors.UNKNOWN_CONVERSATION, f"no conversation {conversation_id!r} of yours"
        )
    return MessagePage(
        messages=[message.down() for message in found.messages],
        has_more=found.has_more,
    )
