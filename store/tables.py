"""The schema. Alembic migrations own it; these classes describe it to the code.

A 1:1 chat is a conversation of kind ``direct`` with two members (one, when a user
writes to themself) and a ``direct_key`` that makes it unique per pair. Groups will
use the same tables with more members.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, ForeignKey, Index, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from .types import BigIntKey, UTCDateTime, utcnow


class Account(SQLModel, table=True):
    __tablename__ = "accounts"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(sa_column=Column(String(32), unique=True, nullable=False))
    password_hash: str = Field(sa_column=Column(String(255), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    disabled: bool = Field(default=False, nullable=False)


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
