"""Bearer tokens of the history API: opaque to clients, stored only as their SHA-256.

A token is 32 random bytes (``secrets.token_urlsafe``), so a plain hash is enough: no
salt or slow hash is needed against guessing, and a stolen ``tokens`` table cannot be
turned back into tokens. Looking a token up by its hash also keeps the comparison off
the request's timing.

``Token`` lives here rather than in ``tables.py``; importing this module registers it
on ``SQLModel.metadata`` (``migrations/env.py`` does), and migration 0003 creates it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Column, ForeignKey, String, delete, func, update
from sqlmodel import Field, Session, SQLModel, col, select

from .tables import Account
from .types import UTCDateTime, utcnow


class Token(SQLModel, table=True):
    __tablename__ = "tokens"

    #: Hex SHA-256 of the token the client holds.
    token_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    username: str = Field(
        sa_column=Column(
            String(32),
            ForeignKey("accounts.username", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A new token, the only time its clear text exists on the server."""

    token: str
    username: str
    expires_at: datetime


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue(
    session: Session, username: str, ttl: timedelta, *, now: datetime | None = None
) -> IssuedToken:
    """Add a token for ``username`` valid for ``ttl`` (flushed, not committed).

    The user's expired tokens are deleted on the way, so the table holds roughly
    the live tokens without a separate sweeper.
    """
    now = now if now is not None else utcnow()
    session.execute(
        delete(Token).where(col(Token.username) == username, col(Token.expires_at) <= now)
    )
    token = secrets.token_urlsafe(32)
    row = Token(
        token_hash=hash_token(token), username=username, created_at=now, expires_at=now + ttl
    )
    session.add(row)
    session.flush()
    return IssuedToken(token=token, username=username, expires_at=row.expires_at)


def resolve(session: Session, token: str, *, now: datetime | None = None) -> str | None:
    """The username a token signs in, or None if it is unknown, expired or disabled."""
    now = now if now is not None else utcnow()
    return session.exec(
        select(Token.username)
        .join(Account, col(Account.username) == col(Token.username))
        .where(
            col(Token.token_hash) == hash_token(token),
            col(Token.expires_at) > now,
            ~col(Account.disabled),
        )
    ).first()


def count_live(session: Session, username: str) -> int:
    """How many unexpired bearer tokens ``username`` holds (its signed-in sessions)."""
    return session.exec(
        select(func.count())
        .select_from(Token)
        .where(col(Token.username) == username, col(Token.expires_at) > utcnow())
    ).one()


def revoke_all(session: Session, username: str, *, keep: str | None = None) -> int:
    """Delete every token of ``username`` but ``keep``, and revoke every MQTT credential
    of the account by raising its ``token_generation`` (flushed, not committed).

    ``keep`` (the token of the request changing the password) survives, but the
    credentials of all devices end: each fetches a new one with its token.

    Returns:
        The account's new token generation (what mosquitto is told, ``core.accounts``).
    """
    query = delete(Token).where(col(Token.username) == username)
    if keep is not None:
        query = query.where(col(Token.token_hash) != hash_token(keep))
    session.execute(query)
    session.execute(
        update(Account)
        .where(col(Account.username) == username)
        .values(token_generation=col(Account.token_generation) + 1)
    )
    session.flush()
    new = session.exec(
        select(Account.token_generation).where(col(Account.username) == username)
    ).first()
    return new or 0


def generation(session: Session, username: str) -> int | None:
    """The token generation of an enabled account; None if it is disabled or missing."""
    return session.exec(
        select(Account.token_generation).where(
            col(Account.username) == username, ~col(Account.disabled)
        )
    ).first()
