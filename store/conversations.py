"""Conversations and their members."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session, select

from .tables import Member


def members_if_member(engine: Engine, conversation: str, user: str) -> tuple[str, ...] | None:
    """The members of a conversation, or ``None`` if ``user`` is not one of them."""
    with Session(engine) as session:
        members = tuple(
            session.exec(
                select(Member.username)
                .where(Member.conversation_id == conversation)
                .order_by(Member.username)
            ).all()
        )
    return members if user in members else None
