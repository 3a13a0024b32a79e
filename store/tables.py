"""The schema. Alembic migrations own it; these classes describe it to the code.

A 1:1 chat is a conversation of kind ``direct`` with two members (one, when a user
writes to themself) and a ``direct_key`` that makes it unique per pair. A group is a
conversation of kind ``group`` with a ``name``, admins and members.

Who sees what: ``members`` holds who is in a conversation now (with their role and
the seq they see it from); ``member_periods`` holds every stretch of seqs each user
was in it, closed by the seq of the event that ended it (removed, left). A user reads
exactly the seqs inside their periods: a removed member keeps what they had, and a
member added again sees each period but not the gap.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from .types import BigIntKey, UTCDateTime, utcnow


class Account(SQLModel, table=True):
    __tablename__ = "accounts"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(sa_column=Column(String(32), unique=True, nullable=False))
    password_hash: str = Field(sa_column=Column(String(255), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    disabled: bool = Field(default=False, nullable=False)
    #: Raised whenever the account's tokens are revoked (``store.tokens.revoke_all``):
    #: MQTT credentials carry the value they were issued under (``core.credentials``),
    #: so raising it revokes every one at once without a table of them.
    token_generation: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
    #: May use the history API's /v1/admin routes; set by ``mqchat user admin`` only.
    is_admin: bool = Field(default=False, nullable=False)


class Conversation(SQLModel, table=True):
    __tablename__ = "conversations"

    id: str = Field(sa_column=Column(String(64), primary_key=True))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    direct_key: str | None = Field(
        default=None, sa_column=Column(String(80), unique=True, nullable=True)
    )
    #: The seq of the newest message; the next one gets last_seq + 1, in the same
    #: transaction that stores it, so seq is gap-free and ordered by commit.
    last_seq: int = Field(default=0, nullable=False)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    #: A group's name; None for a direct conversation.
    name: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    #: The seq of the last membership event (0: none): a writer that cached the members
    #: as of this seq may use them while it is unchanged.
    members_seq: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )


class Member(SQLModel, table=True):
    __tablename__ = "members"

    conversation_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
        )
    )
    username: str = Field(
        sa_column=Column(String(32), ForeignKey("accounts.username"), primary_key=True, index=True)
    )
    joined_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    #: ``admin`` or ``member`` (direct conversations: ``member``).
    role: str = Field(
        default="member", sa_column=Column(String(8), nullable=False, server_default="member")
    )
    #: The seq of the event that made this user a member (1 for a group's first
    #: members and for direct conversations): they see the conversation from here on.
    since_seq: int = Field(default=1, sa_column=Column(Integer, nullable=False, server_default="1"))


class MemberPeriod(SQLModel, table=True):
    """One stretch of seqs a user was (or is) a member of a conversation, both ends in.

    Open (``last_seq`` None) while they are a member; closed by the seq of the event
    that ended it, so a removed member sees their own removal and nothing after it.
    """

    __tablename__ = "member_periods"
    __table_args__ = (Index("ix_member_periods_username", "username", "conversation_id"),)

    conversation_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
        )
    )
    username: str = Field(sa_column=Column(String(32), primary_key=True))
    first_seq: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    last_seq: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))


class Message(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_messages_conversation_seq"),
        UniqueConstraint("sender", "client_id", name="uq_messages_sender_client_id"),
    )

    pk: int | None = Field(default=None, sa_column=Column(BigIntKey, primary_key=True))
    conversation_id: str = Field(
        sa_column=Column(String(64), ForeignKey("conversations.id"), nullable=False)
    )
    seq: int = Field(nullable=False)
    sender: str = Field(sa_column=Column(String(32), nullable=False))
    #: The id the sending client chose: the idempotency key, unique per sender.
    client_id: str = Field(sa_column=Column(String(64), nullable=False))
    body: str = Field(sa_column=Column(Text, nullable=False))
    sent_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    #: A group event's kind (``added``, ``left``, ...); None for a message.
    event: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    #: The event's details as a JSON object (``users``, ``name``, ``promoted``).
    event_data: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class Cursor(SQLModel, table=True):
    """How far one device of one member has received and read a conversation.

    Cursors only move forward. A member's cursor is the furthest of its devices'
    (a message is delivered to bob once any of bob's devices has it).
    """

    __tablename__ = "cursors"

    conversation_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
        )
    )
    username: str = Field(sa_column=Column(String(32), primary_key=True))
    device: str = Field(sa_column=Column(String(64), primary_key=True))
    delivered_seq: int = Field(default=0, nullable=False)
    read_seq: int = Field(default=0, nullable=False)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    read_at: datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)


class CursorMove(SQLModel, table=True):
    """Every forward move of a cursor: when each device got and read each message.

    The delivery trace of message ``seq`` for a device is the first move of each kind
    whose ``up_to`` reaches ``seq``.
    """

    __tablename__ = "cursor_moves"
    __table_args__ = (
        Index("ix_cursor_moves_lookup", "conversation_id", "username", "device", "kind", "up_to"),
    )

    pk: int | None = Field(default=None, sa_column=Column(BigIntKey, primary_key=True))
    conversation_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        )
    )
    username: str = Field(sa_column=Column(String(32), nullable=False))
    device: str = Field(sa_column=Column(String(64), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))  # delivered | read
    up_to: int = Field(nullable=False)
    at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class Device(SQLModel, table=True):
    """A device's presence: a user is online while any of their devices is."""

    __tablename__ = "devices"

    username: str = Field(
        sa_column=Column(String(32), ForeignKey("accounts.username"), primary_key=True)
    )
    device: str = Field(sa_column=Column(String(64), primary_key=True))
    online: bool = Field(default=False, nullable=False)
    last_seen: datetime = Field(sa_type=UTCDateTime, nullable=False)


class PushSubscription(SQLModel, table=True):
    """Where to wake one device of a user up: a Web Push / UnifiedPush endpoint.

    One per device. The endpoint is the device's push service's URL and is untrusted
    (``push/endpoints.py`` checks it before every request, not only when stored).
    """

    __tablename__ = "push_subscriptions"

    username: str = Field(
        sa_column=Column(
            String(32), ForeignKey("accounts.username", ondelete="CASCADE"), primary_key=True
        )
    )
    device: str = Field(sa_column=Column(String(64), primary_key=True))
    channel: str = Field(sa_column=Column(String(16), nullable=False))  # webpush | unifiedpush
    endpoint: str = Field(sa_column=Column(Text, nullable=False))
    #: The device's P-256 public key and auth secret (RFC 8291), base64url.
    p256dh: str = Field(sa_column=Column(String(128), nullable=False))
    auth: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class PushPrefs(SQLModel, table=True):
    """A user's push settings; no row means the defaults (pushed, no preview)."""

    __tablename__ = "push_prefs"

    username: str = Field(
        sa_column=Column(
            String(32), ForeignKey("accounts.username", ondelete="CASCADE"), primary_key=True
        )
    )
    muted: bool = Field(default=False, nullable=False)
    #: Opt-in: the notification carries the message text through the push service.
    preview: bool = Field(default=False, nullable=False)


class PushMute(SQLModel, table=True):
    __tablename__ = "push_mutes"

    username: str = Field(sa_column=Column(String(32), primary_key=True))
    conversation_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
        )
    )


class PushScan(SQLModel, table=True):
    """The push daemons' one shared row: how far they have read ``messages``.

    Whoever holds its row lock scans; the others skip (``SKIP LOCKED``). ``gaps`` are
    message keys below ``message_pk`` not seen yet (a transaction of another bridge
    still open when the scan passed them), as JSON ``[[pk, first_seen_epoch], ...]``.
    """

    __tablename__ = "push_scan"

    id: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    message_pk: int = Field(sa_column=Column(BigIntKey, nullable=False))
    gaps: str = Field(sa_column=Column(Text, nullable=False, server_default="[]"))
    #: The VAPID public key the push daemons sign with (base64url, uncompressed point):
    #: the ``applicationServerKey`` a browser subscribes with, served by the API.
    vapid_public_key: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class PushState(SQLModel, table=True):
    """Per recipient and conversation: what waits for a push decision, and what was decided.

    ``pending_seq`` (0: nothing) is decided at ``due_at``: pushed if no device of the
    user has acknowledged it as delivered by then. ``decided_seq`` only grows, so a
    message scanned twice is decided once.
    """

    __tablename__ = "push_state"
    __table_args__ = (Index("ix_push_state_due", "due_at"),)

    username: str = Field(sa_column=Column(String(32), primary_key=True))
    conversation_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
        )
    )
    pending_seq: int = Field(default=0, nullable=False)
    due_at: datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    decided_seq: int = Field(default=0, nullable=False)
    pushed_at: datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)


class PushOutbox(SQLModel, table=True):
    """One decided push to one device: sent by whichever push daemon claims it first.

    ``state`` is ``due`` until an outcome: ``sent``, ``gone`` (404/410: the
    subscription was removed), ``failed`` (retries spent, or refused endpoint).
    A claim moves ``due_at`` a lease ahead: a daemon that dies holding it leaves it
    to the next one when the lease ends.
    """

    __tablename__ = "push_outbox"
    __table_args__ = (Index("ix_push_outbox_due", "state", "due_at"),)

    pk: int | None = Field(default=None, sa_column=Column(BigIntKey, primary_key=True))
    username: str = Field(sa_column=Column(String(32), nullable=False))
    device: str = Field(sa_column=Column(String(64), nullable=False))
    conversation_id: str = Field(sa_column=Column(String(64), nullable=False))
    #: The push covers the messages ``from_seq .. seq`` (what no device had then).
    from_seq: int = Field(nullable=False)
    seq: int = Field(nullable=False)
    count: int = Field(nullable=False)
    sender: str = Field(sa_column=Column(String(32), nullable=False))
    #: The newest message's text, only for users who opted into previews.
    preview: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: ``created`` / ``added`` when the newest thing covered is the group event that
    #: made this user a member; None for messages.
    event: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    decided_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    due_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    attempts: int = Field(default=0, nullable=False)
    state: str = Field(default="due", sa_column=Column(String(8), nullable=False))
    outcome: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    done_at: datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
