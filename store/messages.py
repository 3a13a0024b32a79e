"""Persisting messages: dedupe on (sender, client id), seq in the committing transaction.

``persist_batch`` is the bridge's one write: a batch of uplinks becomes one
transaction (group commit). Within it each message is handled in arrival order, so
a sender's messages get increasing seqs in their conversation.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from protocol import UpMessage, errors

from .history import HistoryMessage
from .tables import Account, Conversation, Member, Message
from .types import utcnow


@dataclass(frozen=True, slots=True)
class StoredMessage(HistoryMessage):
    """A committed message and who must receive it."""

    members: tuple[str, ...]
    #: True when this uplink was already stored earlier (a resend).
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Outcome:
    stored: StoredMessage | None = None
    error: errors.ProtocolError | None = None


def direct_key(a: str, b: str) -> str:
    # Usernames cannot contain ':', so the key is unambiguous.
    lo, hi = sorted((a, b))
    return f"{lo}:{hi}"


def new_conversation_id() -> str:
    return "c_" + secrets.token_hex(10)


def persist_batch(engine: Engine, uplinks: Sequence[tuple[str, UpMessage]]) -> list[Outcome]:
    """Store a batch of (sender, message) in one transaction; one outcome per input.

    Rejections (unknown recipient, not a member) are decided before anything is
    written for that message, so they never undo the rest of the batch. If the commit
    fails on a constraint (another bridge stored the same message at the same moment)
    the batch is replayed one message per transaction, where dedupe then finds it.
    """
    try:
        with Session(engine) as session:
            # Members per conversation, read once per batch: one query, not one per message.
            members: dict[str, tuple[str, ...]] = {}
            outcomes = [_persist_one(session, sender, up, members) for sender, up in uplinks]
            session.commit()
            return outcomes
    except IntegrityError:
        if len(uplinks) == 1:
            raise
    results: list[Outcome] = []
    for item in uplinks:
        results.extend(persist_batch(engine, [item]))
    return results


def _persist_one(
    session: Session, sender: str, up: UpMessage, members: dict[str, tuple[str, ...]]
) -> Outcome:
    existing = session.exec(
        select(Message).where(Message.sender == sender, Message.client_id == up.id)
    ).first()
    if existing is not None:
        return Outcome(stored=_stored(session, existing, members, duplicate=True))

    if up.to is not None:
        recipient = session.exec(
            select(Account.username).where(Account.username == up.to, ~col(Account.disabled))
        ).first()
        if recipient is None:
            return Outcome(
                error=errors.ProtocolError(errors.UNKNOWN_RECIPIENT, f"no user {up.to!r}", id=up.id)
            )
        conversation_id = _direct_conversation(session, sender, up.to)
    else:
        assert up.conversation is not None
        is_member = session.exec(
            select(Member.username).where(
                Member.conversation_id == up.conversation, Member.username == sender
            )
        ).first()
        if is_member is None:
            # Same answer for "does not exist" and "not yours": no probing.
            return Outcome(
                error=errors.ProtocolError(
                    errors.UNKNOWN_CONVERSATION,
                    f"no conversation {up.conversation!r} of yours",
                    id=up.id,
                )
            )
        conversation_id = up.conversation

    seq = session.execute(
        update(Conversation)
        .where(col(Conversation.id) == conversation_id)
        .values(last_seq=Conversation.last_seq + 1)
        .returning(col(Conversation.last_seq))
    ).scalar_one()
    message = Message(
        conversation_id=conversation_id,
        seq=seq,
        sender=sender,
        client_id=up.id,
        body=up.body,
        sent_at=utcnow(),
    )
    session.add(message)
    session.flush()
    return Outcome(stored=_stored(session, message, members, duplicate=False))


def _direct_conversation(session: Session, a: str, b: str) -> str:
    key = direct_key(a, b)
    found = session.exec(select(Conversation.id).where(Conversation.direct_key == key)).first()
    if found is not None:
        return found
    conversation_id = new_conversation_id()
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(
        insert(Conversation)
        .values(id=conversation_id, kind="direct", direct_key=key, last_seq=0, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["direct_key"])
    )
    found = session.exec(select(Conversation.id).where(Conversation.direct_key == key)).one()
    if found == conversation_id:
        for user in sorted({a, b}):
            session.add(Member(conversation_id=conversation_id, username=user))
        session.flush()
    return found


def _stored(
    session: Session,
    message: Message,
    members: dict[str, tuple[str, ...]],
    *,
    duplicate: bool,
) -> StoredMessage:
    conversation = message.conversation_id
    if conversation not in members:
        members[conversation] = tuple(
            session.exec(
                select(Member.username)
                .where(Member.conversation_id == conversation)
                .order_by(Member.username)
            ).all()
        )
    return StoredMessage(
        client_id=message.client_id,
        conversation=message.conversation_id,
        seq=message.seq,
        sender=message.sender,
        body=message.body,
        sent_at=message.sent_at,
        members=members[conversation],
        duplicate=duplicate,
    )
