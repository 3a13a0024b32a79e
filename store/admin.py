"""What an administrator may look at and change (the history API's ``/v1/admin``).

Reads are bounded (a page of users at most), and nothing here grants the admin role:
``set_admin`` is called by the CLI only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from .accounts import DELETED_HASH, existing
from .tables import Account, Conversation, Device, Message

#: Most users one listing returns.
PAGE_LIMIT = 200


@dataclass(frozen=True, slots=True)
class UserRow:
    """One account as the admin listing shows it."""

    username: str
    disabled: bool
    #: Deleted accounts keep their row (and name) with an unusable password hash.
    deleted: bool
    admin: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One of a user's devices: online now, or when it was last seen."""

    device: str
    online: bool
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Counts over the whole server, as GET /v1/admin/stats returns them."""

    users: int
    disabled_users: int
    admins: int
    conversations: int
    messages: int
    devices_online: int


def set_admin(session: Session, username: str, admin: bool) -> None:
    """Grant or take back the admin role (flushed, not committed).

    Raises:
        ProtocolError: ``unknown_user``.
    """
    existing(session, username)
    session.execute(update(Account).where(col(Account.username) == username).values(is_admin=admin))
    session.flush()


def is_admin(session: Session, username: str) -> bool:
    found = session.exec(
        select(Account.is_admin).where(
            Account.username == username, col(Account.disabled).is_(False)
        )
    ).first()
    return bool(found)


def users(
    session: Session, prefix: str = "", limit: int = PAGE_LIMIT, after: str = ""
) -> list[UserRow]:
    """Accounts whose name starts with ``prefix``, by name, after ``after`` (a cursor)."""
    query = select(Account).order_by(col(Account.username)).limit(min(limit, PAGE_LIMIT))
    if prefix:
        query = query.where(col(Account.username).startswith(prefix, autoescape=True))
    if after:
        query = query.where(col(Account.username) > after)
    return [
        UserRow(
            username=a.username,
            disabled=a.disabled,
            deleted=a.password_hash == DELETED_HASH,
            admin=a.is_admin,
            created_at=a.created_at,
        )
        for a in session.exec(query).all()
    ]


def devices(session: Session, username: str) -> list[DeviceRow]:
    """A user's devices as presence has them.

    Raises:
        ProtocolError: ``unknown_user``.
    """
    existing(session, username)
    rows = session.exec(
        select(Device).where(Device.username == username).order_by(col(Device.device))
    ).all()
    return [DeviceRow(d.device, d.online, d.last_seen) for d in rows]


def stats(session: Session) -> ServerStats:
    def count(query: object) -> int:
        return int(session.exec(query).one())  # type: ignore[call-overload]

    return ServerStats(
        users=count(select(func.count()).select_from(Account)),
        disabled_users=count(select(func.count()).where(col(Account.disabled))),
        admins=count(select(func.count()).where(col(Account.is_admin))),
        conversations=count(select(func.count()).select_from(Conversation)),
        messages=count(select(func.count()).select_from(Message)),
        devices_online=count(select(func.count()).where(col(Device.online))),
    )
