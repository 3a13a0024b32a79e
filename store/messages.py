"""Persisting messages: dedupe on (sender, client id), seq in the committing transaction.

``persist_batch`` is the bridge's one write: a batch of uplinks becomes one
transaction (group commit). Within it each message is handled in arrival order, so
a sender's messages get increasing seqs in their conversation.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    String,
    bindparam,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

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

    The batch costs a fixed number of statements, not a number per message: one read
    each for resends, recipients, direct conversations and members, one UPDATE that
    takes the seqs of every conversation involved, one multi-row INSERT. Messages are
    taken in arrival order, so a sender's messages get increasing seqs.

    Rejections (unknown recipient, not a member) are decided before anything is
    written, so they never undo the rest of the batch. If the commit fails on a
    constraint (another bridge stored the same message at the same moment) the batch
    is replayed one message per transaction, where dedupe then finds it.
    """
    if not uplinks:
        return []
    try:
        with engine.begin() as conn:
            return _persist(conn, uplinks)
    except IntegrityError:
        if len(uplinks) == 1:
            raise
    results: list[Outcome] = []
    for item in uplinks:
        results.extend(persist_batch(engine, [item]))
    return results


_MESSAGE_COLUMNS = (
    col(Message.client_id),
    col(Message.conversation_id),
    col(Message.seq),
    col(Message.sender),
    col(Message.body),
    col(Message.sent_at),
)


@dataclass(frozen=True, slots=True)
class _New:
    sender: str
    up: UpMessage
    conversation: str


@dataclass(frozen=True, slots=True)
class _Again:
    """A resend that arrived in the same batch as its first copy."""

    first: int


def _persist(conn: Connection, uplinks: Sequence[tuple[str, UpMessage]]) -> list[Outcome]:
    # 1. Resends: messages of this batch that are stored already.
    keys = sorted({(sender, up.id) for sender, up in uplinks})
    stored_before = {
        (m.sender, m.client_id): m
        for m in (
            HistoryMessage(*row)
            for row in conn.execute(
                select(*_MESSAGE_COLUMNS).where(
                    tuple_(col(Message.sender), col(Message.client_id)).in_(keys)
                )
            )
        )
    }

    # 2. Recipients that exist and are enabled, and their direct conversations.
    wanted = sorted({up.to for _, up in uplinks if up.to is not None})
    recipients = set(
        conn.scalars(
            select(col(Account.username)).where(
                col(Account.username).in_(wanted), ~col(Account.disabled)
            )
        )
        if wanted
        else ()
    )
    direct = _direct_conversations(
        conn,
        {
            direct_key(sender, up.to): (sender, up.to)
            for sender, up in uplinks
            if up.to is not None and up.to in recipients and (sender, up.id) not in stored_before
        },
    )

    # 3. Members of every conversation involved: membership checks and routing.
    involved = set(direct.values()) | {m.conversation for m in stored_before.values()}
    involved |= {up.conversation for _, up in uplinks if up.conversation is not None}
    members: dict[str, list[str]] = {conversation: [] for conversation in involved}
    if involved:
        for conversation, username in conn.execute(
            select(col(Member.conversation_id), col(Member.username))
            .where(col(Member.conversation_id).in_(sorted(involved)))
            .order_by(col(Member.conversation_id), col(Member.username))
        ):
            members[conversation].append(username)

    # 4. Decide each uplink in arrival order; count the new messages per conversation.
    decided: list[HistoryMessage | _New | _Again | errors.ProtocolError] = []
    first_copy: dict[tuple[str, str], int] = {}
    new_in: dict[str, int] = {}
    for index, (sender, up) in enumerate(uplinks):
        key = (sender, up.id)
        if key in stored_before:
            decided.append(stored_before[key])
        elif key in first_copy:
            decided.append(_Again(first_copy[key]))
        elif up.to is not None and up.to not in recipients:
            decided.append(
                errors.ProtocolError(errors.UNKNOWN_RECIPIENT, f"no user {up.to!r}", id=up.id)
            )
        else:
            conversation = direct[direct_key(sender, up.to)] if up.to else up.conversation or ""
            if sender not in members.get(conversation, ()):
                # Same answer for "does not exist" and "not yours": no probing.
                decided.append(
                    errors.ProtocolError(
                        errors.UNKNOWN_CONVERSATION,
                        f"no conversation {conversation!r} of yours",
                        id=up.id,
                    )
                )
                continue
            first_copy[key] = index
            new_in[conversation] = new_in.get(conversation, 0) + 1
            decided.append(_New(sender, up, conversation))

    # 5. The seqs of every conversation (one UPDATE on PostgreSQL), one INSERT for all.
    next_seq = {
        conversation: last_seq - new_in[conversation] + 1
        for conversation, last_seq in _take_seqs(conn, new_in)
    }
    now = utcnow()
    rows: list[dict[str, object]] = []
    outcomes: list[Outcome] = []
    for item in decided:
        if isinstance(item, errors.ProtocolError):
            outcomes.append(Outcome(error=item))
        elif isinstance(item, _Again):
            first = outcomes[item.first].stored
            assert first is not None
            outcomes.append(Outcome(stored=replace(first, duplicate=True)))
        elif isinstance(item, _New):
            seq = next_seq[item.conversation]
            next_seq[item.conversation] = seq + 1
            message = HistoryMessage(
                item.up.id, item.conversation, seq, item.sender, item.up.body, now
            )
            rows.append(
                {
                    "conversation_id": item.conversation,
                    "seq": seq,
                    "sender": item.sender,
                    "client_id": item.up.id,
                    "body": item.up.body,
                    "sent_at": now,
                }
            )
            outcomes.append(Outcome(stored=_stored(message, members, duplicate=False)))
        else:
            outcomes.append(Outcome(stored=_stored(item, members, duplicate=True)))
    if rows:
        conn.execute(insert(Message), rows)
    return outcomes


def _take_seqs(conn: Connection, counts: dict[str, int]) -> list[tuple[str, int]]:
    """Add ``counts[c]`` to each conversation's ``last_seq``; the new ``last_seq`` of each."""
    if not counts:
        return []
    if conn.dialect.name != "postgresql":
        # SQLite cannot name a VALUES list's columns; it is in-process, so one short
        # statement per conversation costs no round trips.
        return [
            (
                conversation,
                conn.execute(
                    update(Conversation)
                    .where(col(Conversation.id) == conversation)
                    .values(last_seq=col(Conversation.last_seq) + n)
                    .returning(col(Conversation.last_seq))
                ).scalar_one(),
            )
            for conversation, n in sorted(counts.items())
        ]
    # Two arrays, not a VALUES list: the statement text is the same for every batch,
    # so SQLAlchemy compiles it once (rendering a VALUES list cost ~3 ms a batch).
    ids, ns = zip(*sorted(counts.items()), strict=True)
    return [
        (conversation, last_seq)
        for conversation, last_seq in conn.execute(
            _TAKE_SEQS_PG, {"ids": list(ids), "ns": list(ns)}
        )
    ]


_counts = (
    func.unnest(
        bindparam("ids", type_=postgresql.ARRAY(String)),
        bindparam("ns", type_=postgresql.ARRAY(Integer)),
    )
    .table_valued("id", "n")
    .render_derived(name="counts")
)
_TAKE_SEQS_PG = (
    update(Conversation)
    .where(col(Conversation.id) == _counts.c.id)
    .values(last_seq=col(Conversation.last_seq) + _counts.c.n)
    .returning(col(Conversation.id), col(Conversation.last_seq))
)


def _direct_conversations(conn: Connection, pairs: dict[str, tuple[str, str]]) -> dict[str, str]:
    """The conversation id of each direct key, creating the ones that do not exist yet."""
    if not pairs:
        return {}

    def existing() -> dict[str, str]:
        return {
            key: conversation
            for conversation, key in conn.execute(
                select(col(Conversation.id), col(Conversation.direct_key)).where(
                    col(Conversation.direct_key).in_(sorted(pairs))
                )
            )
            if key is not None
        }

    found = existing()
    missing = sorted(set(pairs) - set(found))
    if not missing:
        return found
    created = {key: new_conversation_id() for key in missing}
    dialect = conn.dialect.name
    insert_ignoring = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    conn.execute(
        insert_ignoring(Conversation)
        .values(
            [
                {"id": cid, "kind": "direct", "direct_key": key, "last_seq": 0, "created_at": now}
                for key, cid in created.items()
            ]
        )
        .on_conflict_do_nothing(index_elements=["direct_key"])
    )
    found = existing()
    member_rows = [
        {"conversation_id": cid, "username": user, "joined_at": now}
        for key, cid in created.items()
        if found[key] == cid  # ours: another writer did not create it first
        for user in sorted(set(pairs[key]))
    ]
    if member_rows:
        conn.execute(insert(Member), member_rows)
    return found


def _stored(
    message: HistoryMessage, members: dict[str, list[str]], *, duplicate: bool
) -> StoredMessage:
    return StoredMessage(
        client_id=message.client_id,
        conversation=message.conversation,
        seq=message.seq,
        sender=message.sender,
        body=message.body,
        sent_at=message.sent_at,
        members=tuple(members[message.conversation]),
        duplicate=duplicate,
    )
