"""Reading history for one user: conversations, pages of messages, delivery traces, presence.

Every function takes the caller's username and filters by it in the SQL itself (a
membership join or ``EXISTS``), never by checking rows afterwards: a conversation or
message that is not the caller's is indistinguishable from one that does not exist.
What a user may read is the seqs inside their membership periods
(:func:`visible_to`): a group member from the seq they were added at, a removed one
up to their removal, a member added again in each period but not the gap.

::

    history API ──▶ conversations_of(me)         members ⋈ conversations ⟕ last message
                ──▶ page(me, conversation, ...)   messages by (conversation_id, seq)
                ──▶ delivery_trace(me, id)        messages ▶ cursors ▶ first cursor_moves
                ──▶ presence(user)                devices
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy import ColumnElement, and_, case, exists, func
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from protocol import DownMessage

from . import accounts
from .tables import Conversation, Cursor, CursorMove, Device, Member, MemberPeriod, Message

MAX_CONVERSATIONS: Final = 200
#: Above every seq: the end of an open membership period.
_NO_END: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """A stored message as read back: plain values, no ORM state (pages are hot paths).

    A group event is one too: ``event`` names it and ``event_data`` holds its details
    as the JSON object ``store.groups`` wrote.
    """

    #: The id its sender gave it (``id`` on the wire): a resend with it is stored once.
    client_id: str
    conversation: str
    seq: int
    sender: str
    body: str
    sent_at: datetime
    event: str | None = None
    event_data: str | None = None

    def down(self) -> DownMessage:
        """As the bridge delivers it on ``down/msg`` and the API returns it.

        The one place a stored message becomes a wire one. It lives here because
        ``protocol`` is below ``store`` and cannot know this class, and the bridge
        and the history API both need it.
        """
        details: dict[str, Any] = json.loads(self.event_data) if self.event_data else {}
        return DownMessage(
            id=self.client_id,
            conversation=self.conversation,
            seq=self.seq,
            from_=self.sender,
            body=self.body,
            sent_at=self.sent_at,
            event=self.event,
            **details,
        )


#: The columns of a HistoryMessage, in its field order.
MESSAGE_COLUMNS: Final = (
    col(Message.client_id),
    col(Message.conversation_id),
    col(Message.seq),
    col(Message.sender),
    col(Message.body),
    col(Message.sent_at),
    col(Message.event),
    col(Message.event_data),
)


def to_history_message(row: Sequence[Any]) -> HistoryMessage:
    return HistoryMessage(*row)


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    id: str
    kind: str
    #: The current members; none when the caller is no longer one.
    members: tuple[str, ...]
    #: The newest message (or event) the caller may read.
    last_message: HistoryMessage | None
    #: Messages after the caller's read cursor (the furthest of their devices) that
    #: others sent, within the caller's periods; events are not counted.
    unread: int
    #: A group's name; None for a direct conversation.
    name: str | None = None
    #: False for a group the caller left or was removed from: readable up to then.
    member: bool = True


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A group member as the members listing shows it."""

    username: str
    role: str
    #: The seq the member sees the conversation from.
    since_seq: int


@dataclass(frozen=True, slots=True)
class Page:
    """Messages in ascending seq; ``has_more`` says more lie beyond in the paging direction."""

    messages: list[HistoryMessage]
    has_more: bool


#: Entries of one delivery trace at most.
MAX_TRACE_DEVICES = 256


@dataclass(frozen=True, slots=True)
class DeviceTrace:
    user: str
    #: None for a member none of whose devices has acked the conversation yet.
    device: str | None
    delivered_at: datetime | None
    read_at: datetime | None


@dataclass(frozen=True, slots=True)
class Tally:
    """How far one message got: of the ``members`` who may read it (its sender aside),
    how many have it on a device (``delivered``) and how many have read it."""

    members: int
    delivered: int
    read: int


@dataclass(frozen=True, slots=True)
class MessageTrace:
    message: HistoryMessage
    devices: list[DeviceTrace]
    #: More devices than :data:`MAX_TRACE_DEVICES` have cursors; ``devices`` is cut.
    more_devices: bool = False
    tally: Tally = Tally(0, 0, 0)


@dataclass(frozen=True, slots=True)
class Presence:
    username: str
    online: bool
    last_seen: datetime | None


#: Made once: building an alias costs more than the query it is used in.
_CALLER_MEMBERSHIP: Final = aliased(Member, name="caller_membership")
_CALLER_PERIOD: Final = aliased(MemberPeriod, name="caller_period")
_LAST_MESSAGE: Final = aliased(Message, name="last_message")
_COUNTED_MESSAGE: Final = aliased(Message, name="counted")


def _is_member(conversation_id: Any, username: str) -> ColumnElement[bool]:
    """``EXISTS`` the membership of ``username`` in the conversation ``conversation_id``.

    On an alias of ``members``, so it never correlates with a ``members`` of the outer
    query (which may be joined on another user).
    """
    membership = _CALLER_MEMBERSHIP
    return exists().where(
        col(membership.conversation_id) == conversation_id, col(membership.username) == username
    )


def visible_to(conversation_id: Any, seq: Any, username: str) -> ColumnElement[bool]:
    """``EXISTS`` a membership period of ``username`` that holds ``seq`` of the conversation.

    The one rule of who reads what, for pages, search, lookups and traces alike.
    """
    period = _CALLER_PERIOD
    return exists().where(
        col(period.conversation_id) == conversation_id,
        col(period.username) == username,
        col(period.first_seq) <= seq,
        func.coalesce(col(period.last_seq), _NO_END) >= seq,
    )


def was_member(session: Session, username: str, conversation_id: str) -> bool:
    """Whether ``username`` is or was a member: has any seqs of it to read."""
    found = session.exec(
        select(MemberPeriod.username).where(
            col(MemberPeriod.conversation_id) == conversation_id,
            col(MemberPeriod.username) == username,
        )
    ).first()
    return found is not None


def is_member(session: Session, username: str, conversation_id: str) -> bool:
    found = session.exec(
        select(Member.username).where(
            col(Member.conversation_id) == conversation_id, col(Member.username) == username
        )
    ).first()
    return found is not None


def conversations_of(
    session: Session, username: str, *, limit: int = MAX_CONVERSATIONS
) -> list[ConversationSummary]:
    """The caller's conversations (groups left included), newest activity (last message
    the caller may read, else creation) first."""
    last, counted = _LAST_MESSAGE, _COUNTED_MESSAGE
    mine = (
        sa.select(
            col(MemberPeriod.conversation_id).label("conversation_id"),
            func.max(func.coalesce(col(MemberPeriod.last_seq), _NO_END)).label("upto"),
        )
        .where(col(MemberPeriod.username) == username)
        .group_by(col(MemberPeriod.conversation_id))
        .subquery("mine")
    )
    # The newest seq the caller may read: the conversation's last, or where they left.
    newest = case((mine.c.upto < Conversation.last_seq, mine.c.upto), else_=Conversation.last_seq)
    read_cursor = (
        select(func.coalesce(func.max(Cursor.read_seq), 0))
        .where(col(Cursor.conversation_id) == Conversation.id, col(Cursor.username) == username)
        .correlate(Conversation)
        .scalar_subquery()
    )
    unread = (
        select(func.count())
        .select_from(counted)
        .where(
            col(counted.conversation_id) == Conversation.id,
            col(counted.seq) > read_cursor,
            col(counted.sender) != username,
            col(counted.event).is_(None),
            visible_to(counted.conversation_id, counted.seq, username),
        )
        .correlate(Conversation)
        .scalar_subquery()
    )
    rows = session.execute(
        sa.select(
            col(Conversation.id),
            col(Conversation.kind),
            col(Conversation.name),
            _is_member(Conversation.id, username),
            unread,
            col(last.client_id),
            col(last.conversation_id),
            col(last.seq),
            col(last.sender),
            col(last.body),
            col(last.sent_at),
            col(last.event),
            col(last.event_data),
        )
        .join(mine, mine.c.conversation_id == Conversation.id)
        # last_seq moves in the transaction that stores the message, so this is the newest.
        .outerjoin(
            last,
            and_(col(last.conversation_id) == Conversation.id, col(last.seq) == newest),
        )
        .order_by(
            func.coalesce(col(last.sent_at), col(Conversation.created_at)).desc(),
            col(Conversation.id),
        )
        .limit(limit)
    ).all()
    members = _members_of(session, username, [row[0] for row in rows])
    summaries = []
    for conversation_id, kind, name, member, unread_count, *last_columns in rows:
        summaries.append(
            ConversationSummary(
                id=conversation_id,
                kind=kind,
                members=members.get(conversation_id, ()),
                # An outer join: no message yet leaves every column of it null.
                last_message=None if last_columns[0] is None else to_history_message(last_columns),
                unread=unread_count,
                name=name,
                member=bool(member),
            )
        )
    return summaries


def members(session: Session, username: str, conversation_id: str) -> list[MemberInfo] | None:
    """A conversation's current members with their roles, or None if the caller is not
    one of them (a former member reads what they had, not who is in it now)."""
    if not is_member(session, username, conversation_id):
        return None
    rows = session.exec(
        select(Member.username, Member.role, Member.since_seq)
        .where(col(Member.conversation_id) == conversation_id)
        .order_by(col(Member.username))
    ).all()
    return [MemberInfo(user, role, since_seq) for user, role, since_seq in rows]


def _members_of(
    session: Session, username: str, conversation_ids: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    if not conversation_ids:
        return {}
    rows = session.exec(
        select(Member.conversation_id, Member.username)
        .where(
            col(Member.conversation_id).in_(conversation_ids),
            _is_member(Member.conversation_id, username),
        )
        .order_by(col(Member.conversation_id), col(Member.username))
    ).all()
    members: dict[str, list[str]] = {}
    for conversation_id, member in rows:
        members.setdefault(conversation_id, []).append(member)
    return {key: tuple(names) for key, names in members.items()}


def page(
    session: Session,
    username: str,
    conversation_id: str,
    *,
    before: int | None = None,
    after: int | None = None,
    limit: int = 50,
) -> Page | None:
    """A page of a conversation by seq, or None if it is not the caller's.

    ``after`` pages forwards (the oldest messages past it), ``before`` backwards
    (the newest ones short of it), neither gives the newest page; both bound a range
    paged forwards from ``after``. Either way the page is in ascending seq.
    """
    query = sa.select(*MESSAGE_COLUMNS).where(
        col(Message.conversation_id) == conversation_id,
        visible_to(Message.conversation_id, Message.seq, username),
    )
    if after is not None:
        query = query.where(col(Message.seq) > after)
    if before is not None:
        query = query.where(col(Message.seq) < before)
    forwards = after is not None
    query = query.order_by(col(Message.seq) if forwards else col(Message.seq).desc())
    rows = session.execute(query.limit(limit + 1)).all()
    # The membership test is in the query; only an empty page needs telling apart.
    if not rows and not was_member(session, username, conversation_id):
        return None
    messages = [to_history_message(row) for row in rows[:limit]]
    if not forwards:
        messages.reverse()
    return Page(messages=messages, has_more=len(rows) > limit)


def find_message(session: Session, username: str, client_id: str) -> HistoryMessage | None:
    """The caller's own message with this client id, else another member's in one of
    the caller's conversations (the newest, should several senders have used it); only
    one inside the caller's periods."""
    own = session.execute(
        sa.select(*MESSAGE_COLUMNS).where(
            col(Message.sender) == username,
            col(Message.client_id) == client_id,
            visible_to(Message.conversation_id, Message.seq, username),
        )
    ).first()
    if own is not None:
        return to_history_message(own)
    other = session.execute(
        sa.select(*MESSAGE_COLUMNS)
        .where(
            col(Message.client_id) == client_id,
            col(Message.conversation_id).in_(
                select(MemberPeriod.conversation_id).where(col(MemberPeriod.username) == username)
            ),
            visible_to(Message.conversation_id, Message.seq, username),
        )
        .order_by(col(Message.pk).desc())
        .limit(1)
    ).first()
    return None if other is None else to_history_message(other)


def _first_move(kind: Literal["delivered", "read"], seq: int) -> Any:
    """When a device's cursor of this kind first reached ``seq`` (cursors only move on)."""
    return (
        select(func.min(CursorMove.at))
        .where(
            col(CursorMove.conversation_id) == Cursor.conversation_id,
            col(CursorMove.username) == Cursor.username,
            col(CursorMove.device) == Cursor.device,
            col(CursorMove.kind) == kind,
            col(CursorMove.up_to) >= seq,
        )
        .correlate(Cursor)
        .scalar_subquery()
    )


def delivery_trace(session: Session, username: str, client_id: str) -> MessageTrace | None:
    """A message the caller may see, with when each recipient device got and read it.

    Recipients are everyone whose membership period holds the message (members removed
    since included), the sender aside: one entry per device that has a cursor in the
    conversation, or one with no device for a recipient none of whose devices has
    acked yet; a device that has not reached the message has ``None`` for that step.
    At most :data:`MAX_TRACE_DEVICES` entries: an account created 5,000 device names
    once and made one trace 870 KB (``store.devices`` caps new names now; accounts
    from before the cap may still have more). The tally counts every recipient.
    """
    message = find_message(session, username, client_id)
    if message is None:
        return None
    period = MemberPeriod
    rows = session.execute(
        select(
            period.username,
            Cursor.device,
            _first_move("delivered", message.seq),
            _first_move("read", message.seq),
        )
        .select_from(period)
        .outerjoin(
            Cursor,
            and_(
                col(Cursor.conversation_id) == col(period.conversation_id),
                col(Cursor.username) == col(period.username),
            ),
        )
        .where(
            col(period.conversation_id) == message.conversation,
            col(period.username) != message.sender,
            *_holds(message.seq),
        )
        .order_by(col(period.username), col(Cursor.device))
        .limit(MAX_TRACE_DEVICES + 1)
    ).all()
    devices = [
        DeviceTrace(user=user, device=device, delivered_at=delivered_at, read_at=read_at)
        for user, device, delivered_at, read_at in rows[:MAX_TRACE_DEVICES]
    ]
    return MessageTrace(
        message=message,
        devices=devices,
        more_devices=len(rows) > MAX_TRACE_DEVICES,
        tally=tally(session, message.conversation, message.seq, message.sender),
    )


def _holds(seq: int) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """A ``member_periods`` row's period holds ``seq``."""
    return (
        col(MemberPeriod.first_seq) <= seq,
        func.coalesce(col(MemberPeriod.last_seq), _NO_END) >= seq,
    )


def tally(session: Session, conversation_id: str, seq: int, sender: str) -> Tally:
    """Of the users who may read message ``seq`` (its ``sender`` aside), how many have
    it delivered and read: one query over the periods and each one's furthest cursor.

    A user has one period at most that holds a seq, so each is counted once.
    """
    furthest = (
        sa.select(
            col(Cursor.username).label("username"),
            func.max(Cursor.delivered_seq).label("delivered"),
            func.max(Cursor.read_seq).label("read"),
        )
        .where(col(Cursor.conversation_id) == conversation_id)
        .group_by(col(Cursor.username))
        .subquery("furthest")
    )
    members, delivered, read = session.execute(
        sa.select(
            func.count(),
            func.coalesce(func.sum(case((furthest.c.delivered >= seq, 1), else_=0)), 0),
            func.coalesce(func.sum(case((furthest.c.read >= seq, 1), else_=0)), 0),
        )
        .select_from(MemberPeriod)
        .outerjoin(furthest, furthest.c.username == col(MemberPeriod.username))
        .where(
            col(MemberPeriod.conversation_id) == conversation_id,
            col(MemberPeriod.username) != sender,
            *_holds(seq),
        )
    ).one()
    return Tally(members=members, delivered=int(delivered), read=int(read))


def presence(session: Session, username: str) -> Presence | None:
    """Online while any device is; None if there is no such (enabled) account."""
    if not accounts.exists(session, username):
        return None
    online_devices, last_seen = session.execute(
        select(
            func.coalesce(func.sum(case((col(Device.online), 1), else_=0)), 0),
            func.max(Device.last_seen),
        ).where(col(Device.username) == username)
    ).one()
    return Presence(username=username, online=online_devices > 0, last_seen=last_seen)
