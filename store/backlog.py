"""The undelivered backlog: messages stored that some recipient has on none of its devices.

The number an operator watches to know mqchat keeps its promise. A member's delivered
cursor is the highest ``delivered_seq`` over its devices (``cursors``); a message is
undelivered while any member but its sender has a cursor below its seq.

Bounded on purpose, because it runs every few seconds on a live database: only the
newest :data:`NEWEST` messages (by primary key, an index walk) and of those only the
last day's are looked at. An older backlog is the history API's to fill, and a device
away for a day is not mqchat breaking its promise.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import Engine, and_, case, func, select
from sqlmodel import Session, col

from .tables import Cursor, Device, Member, Message

#: Messages (newest first, by primary key) one count looks at.
NEWEST: Final = 100_000
#: Messages older than this are left out.
HORIZON: Final = timedelta(days=1)


def undelivered(engine: Engine, now: datetime, ages: Sequence[timedelta]) -> list[int]:
    """How many messages of the last day are undelivered and older than each of ``ages``.

    Cumulative, as Prometheus' ``le`` buckets are the other way round: the count for
    ``timedelta(0)`` is every undelivered message, the next ones fewer.
    """
    delivered = (
        select(func.coalesce(func.max(Cursor.delivered_seq), 0))
        .where(
            col(Cursor.conversation_id) == col(Message.conversation_id),
            col(Cursor.username) == col(Member.username),
        )
        .scalar_subquery()
    )
    newest = select(func.coalesce(func.max(Message.pk), 0)).scalar_subquery()
    waiting = (
        select(col(Message.pk), col(Message.sent_at))
        .join(
            Member,
            and_(
                col(Member.conversation_id) == col(Message.conversation_id),
                col(Member.username) != col(Message.sender),
                col(Member.since_seq) <= col(Message.seq),
            ),
        )
        .where(
            col(Message.pk) > newest - NEWEST,
            col(Message.sent_at) >= now - HORIZON,
            col(Message.event).is_(None),
            delivered < col(Message.seq),
        )
        .distinct()
        .subquery()
    )
    counts = [
        func.coalesce(func.sum(case((waiting.c.sent_at <= now - age, 1), else_=0)), 0)
        for age in ages
    ]
    with Session(engine) as session:
        row = session.execute(select(*counts)).one()
    return [int(value) for value in row]


def online(engine: Engine) -> tuple[int, int]:
    """(users online, devices online), as presence has them (``store.presence``)."""
    with Session(engine) as session:
        row = session.execute(
            select(func.count(func.distinct(Device.username)), func.count()).where(
                col(Device.online)
            )
        ).one()
    return int(row[0]), int(row[1])
