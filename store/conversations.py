"""Conversations and their members."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session, select

from .messages import GroupMembers
from .tables import Conversation, Member


def members_if_member(engine: Engine, conversation: str, user: str) -> tuple[str, ...] | None:
    """The members of a conversation, or ``None`` if ``user`` is not one of them."""
    with Session(engine) as session:
        members = _members(session, conversation)
    return members if user in members else None


def current_members_if_member(
    engine: Engine, conversation: str, user: str, kept: GroupMembers
) -> tuple[str, ...] | None:
    """:func:`members_if_member` as of the conversation's ``members_seq`` now.

    One key lookup while ``kept`` holds the members at that ``members_seq``: a member
    removed through any bridge instance is left out from the removal's commit on, as
    for messages (a cache trusted for a while would relay to them meanwhile).
    """
    with Session(engine) as session:
        members_seq = session.exec(
            select(Conversation.members_seq).where(Conversation.id == conversation)
        ).first()
        if members_seq is None:
            return None
        members = kept.members_of(conversation, members_seq)
        if members is None:
            members = _members(session, conversation)
            kept.learn(conversation, members_seq, members)
    return members if user in members else None


def _members(session: Session, conversation: str) -> tuple[str, ...]:
    return tuple(
        session.exec(
            select(Member.username)
            .where(Member.conversation_id == conversation)
            .order_by(Member.username)
        ).all()
    )
