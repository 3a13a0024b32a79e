"""Persisting messages: dedupe on (sender, client id), seq in the committing transaction.

``persist_batch`` is the bridge's one write: a batch of uplinks becomes one
transaction (group commit). Within it each message is handled in arrival order, so
a sender's messages get increasing seqs in their conversation.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    String,
    Text,
    bindparam,
    func,
    insert,
    null,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.types import TypeEngine
from sqlmodel import col

from protocol import UpMessage, errors

from .history import HistoryMessage
from .tables import Account, Conversation, Member, Message
from .types import UTCDateTime, utcnow


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


class DirectConversations:
    """What a writer has learnt of direct conversations: their ids and members.

    A pair's direct conversation, once committed, never changes, and neither do its
    members (the pair), so a long-lived writer (the bridge) keeps them and skips the
    two reads that find them. Only committed conversations are kept. Bounded: the
    whole cache is dropped when it would grow past ``limit`` entries.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._ids: dict[str, str] = {}
        self._members: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def id_of(self, key: str) -> str | None:
        return self._ids.get(key)

    def members_of(self, conversation: str) -> tuple[str, ...] | None:
        return self._members.get(conversation)

    def learn(self, ids: dict[str, str], members: Mapping[str, Sequence[str]]) -> None:
        """Keep ``ids`` (direct key -> conversation), committed, with their members."""
        if len(self._ids) + len(ids) > self.limit:
            self._ids.clear()
            self._members.clear()
        for key, conversation in ids.items():
            self._ids[key] = conversation
            self._members[conversation] = tuple(members[conversation])


def persist_batch(
    engine: Engine,
    uplinks: Sequence[tuple[str, UpMessage]],
    directs: DirectConversations | None = None,
) -> list[Outcome]:
    """Store a batch of (sender, message) at once; one outcome per input.

    The batch costs a fixed number of statements, not a number per message: one read
    for resends and recipients, one each for direct conversations and members, and
    one write that takes the seqs of every conversation involved and inserts every
    new message. Messages are taken in arrival order, so a sender's messages get
    increasing seqs. With ``directs``, direct conversations it knows are not read
    again, and the ones this batch found or created are added to it once committed.

    On PostgreSQL each statement is its own transaction (autocommit): the write is a
    single statement, so its seqs and rows commit together or not at all, and a
    batch whose conversations are all known costs two round trips. The reads are
    what a transaction at READ COMMITTED would see too; a new conversation is
    created with its members in a transaction of its own. On SQLite (in-process, no
    round trips) the whole batch is one ``BEGIN IMMEDIATE`` transaction.

    Rejections (unknown recipient, not a member) are decided before anything is
    written, so they never undo the rest of the batch. If the write fails on a
    constraint (another bridge stored the same message at the same moment) the batch
    is replayed one message at a time, where dedupe then finds it.
    """
    if not uplinks:
        return []
    known = directs if directs is not None else DirectConversations()
    try:
        with _writing(engine) as conn:
            outcomes, found, members = _persist(conn, uplinks, known)
    except IntegrityError:
        if len(uplinks) == 1:
            raise
    else:
        if directs is not None:
            directs.learn(found, members)  # committed now
        return outcomes
    results: list[Outcome] = []
    for item in uplinks:
        results.extend(persist_batch(engine, [item], directs))
    return results


_AUTOCOMMIT = "AUTOCOMMIT"


@contextmanager
def _writing(engine: Engine) -> Iterator[Connection]:
    """A connection to store a batch on: see :func:`persist_batch` for why these two."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level=_AUTOCOMMIT) as conn:
            yield conn
    else:
        with engine.begin() as conn:
            yield conn


def _autocommit(conn: Connection) -> bool:
    return conn.get_execution_options().get("isolation_level") == _AUTOCOMMIT


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
    #: Its place among the batch's new messages of its conversation, from 1.
    k: int


@dataclass(frozen=True, slots=True)
class _Again:
    """A resend that arrived in the same batch as its first copy."""

    first: int


def _persist(
    conn: Connection, uplinks: Sequence[tuple[str, UpMessage]], known: DirectConversations
) -> tuple[list[Outcome], dict[str, str], dict[str, Sequence[str]]]:
    """The outcomes, and the direct conversations read or created here with their members."""
    # 1. Resends (messages of this batch stored already) and the recipients that
    #    exist and are enabled: one read. An account row has no client id.
    keys = sorted({(sender, up.id) for sender, up in uplinks})
    wanted = sorted({up.to for _, up in uplinks if up.to is not None})
    resends = select(*_MESSAGE_COLUMNS).where(
        tuple_(col(Message.sender), col(Message.client_id)).in_(keys)
    )
    accounts = select(null(), null(), null(), col(Account.username), null(), null()).where(
        col(Account.username).in_(wanted), ~col(Account.disabled)
    )
    read = resends.union_all(accounts) if wanted else resends
    stored_before: dict[tuple[str, str], HistoryMessage] = {}
    recipients: set[str] = set()
    for row in conn.execute(read):
        if row.client_id is None:
            recipients.add(row.sender)
        else:
            stored_before[row.sender, row.client_id] = HistoryMessage(*row)

    # 2. The direct conversations of those recipients: known ones from ``known``.
    pairs = {
        direct_key(sender, up.to): (sender, up.to)
        for sender, up in uplinks
        if up.to is not None and up.to in recipients and (sender, up.id) not in stored_before
    }
    direct = {pair: cid for pair in pairs if (cid := known.id_of(pair)) is not None}
    missing = {pair: users for pair, users in pairs.items() if pair not in direct}
    if missing and _autocommit(conn):
        # Created with its members in one transaction, of its own.
        with conn.engine.begin() as creating:
            found = _direct_conversations(creating, missing)
    else:
        found = _direct_conversations(conn, missing)
    direct.update(found)

    # 3. Members of every conversation involved: membership checks and routing.
    involved = set(direct.values()) | {m.conversation for m in stored_before.values()}
    involved |= {up.conversation for _, up in uplinks if up.conversation is not None}
    members: dict[str, Sequence[str]] = {
        cid: cached for cid in involved if (cached := known.members_of(cid)) is not None
    }
    unknown = sorted(involved - members.keys())
    looked_up: dict[str, list[str]] = {conversation: [] for conversation in unknown}
    if unknown:
        for conversation, username in conn.execute(
            select(col(Member.conversation_id), col(Member.username))
            .where(col(Member.conversation_id).in_(unknown))
            .order_by(col(Member.conversation_id), col(Member.username))
        ):
            looked_up[conversation].append(username)
    members.update(looked_up)

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
            decided.append(_New(sender, up, conversation, new_in[conversation]))

    # 5. Take the seqs and store the new messages: one statement on PostgreSQL.
    now = utcnow()
    seqs = _store_new([item for item in decided if isinstance(item, _New)], new_in, now, conn)
    outcomes: list[Outcome] = []
    for item in decided:
        if isinstance(item, errors.ProtocolError):
            outcomes.append(Outcome(error=item))
        elif isinstance(item, _Again):
            first = outcomes[item.first].stored
            assert first is not None
            outcomes.append(Outcome(stored=replace(first, duplicate=True)))
        elif isinstance(item, _New):
            message = HistoryMessage(
                item.up.id,
                item.conversation,
                seqs[item.sender, item.up.id],
                item.sender,
                item.up.body,
                now,
            )
            outcomes.append(Outcome(stored=_stored(message, members, duplicate=False)))
        else:
            outcomes.append(Outcome(stored=_stored(item, members, duplicate=True)))
    return outcomes, found, members


def _store_new(
    new: list[_New], counts: dict[str, int], now: datetime, conn: Connection
) -> dict[tuple[str, str], int]:
    """Add ``counts[c]`` to each conversation's ``last_seq`` and insert the messages.

    A message's seq is its conversation's ``last_seq`` before the batch plus its
    place (``k``, from 1) among the batch's new messages of that conversation.
    Returns the seq of each (sender, client id).
    """
    if not new:
        return {}
    if conn.dialect.name == "postgresql":
        # One round trip: the UPDATE is a CTE of the INSERT. Arrays, not VALUES
        # lists, so the statement text is the same for every batch and compiles once.
        ids, ns = zip(*sorted(counts.items()), strict=True)
        stored = conn.execute(
            _STORE_NEW_PG,
            {
                "ids": list(ids),
                "ns": list(ns),
                "conversations": [item.conversation for item in new],
                "ks": [item.k for item in new],
                "senders": [item.sender for item in new],
                "client_ids": [item.up.id for item in new],
                "bodies": [item.up.body for item in new],
                "sent_at": now,
            },
        ).all()
        if len(stored) != len(new):
            # A conversation row missing (they are never deleted). The uplinks are not
            # acknowledged, so they come back, and what was stored is found as resends.
            raise RuntimeError(f"stored {len(stored)} of {len(new)} messages")
        return {(sender, client_id): seq for sender, client_id, seq in stored}
    # SQLite cannot name a VALUES list's columns; it is in-process, so one short
    # statement per conversation costs no round trips.
    last_seq = {
        conversation: conn.execute(
            update(Conversation)
            .where(col(Conversation.id) == conversation)
            .values(last_seq=col(Conversation.last_seq) + n)
            .returning(col(Conversation.last_seq))
        ).scalar_one()
        for conversation, n in sorted(counts.items())
    }
    seqs = {
        (item.sender, item.up.id): last_seq[item.conversation] - counts[item.conversation] + item.k
        for item in new
    }
    conn.execute(
        insert(Message),
        [
            {
                "conversation_id": item.conversation,
                "seq": seqs[item.sender, item.up.id],
                "sender": item.sender,
                "client_id": item.up.id,
                "body": item.up.body,
                "sent_at": now,
            }
            for item in new
        ],
    )
    return seqs


def _unnest(ordinality: str | None = None, **columns: TypeEngine[Any]) -> TableValuedAlias:
    """``unnest(:a, :b, ...) AS name(a, b, ...)``: one array parameter per column."""
    return func.unnest(
        *(bindparam(name, type_=postgresql.ARRAY(type_)) for name, type_ in columns.items())
    ).table_valued(*columns, with_ordinality=ordinality)


_counts = _unnest(ids=String(), ns=Integer()).render_derived(name="counts")
_taken = (
    update(Conversation)
    .where(col(Conversation.id) == _counts.c.ids)
    .values(last_seq=col(Conversation.last_seq) + _counts.c.ns)
    .returning(col(Conversation.id), col(Conversation.last_seq), _counts.c.ns)
    .cte("taken")
)
_new = _unnest(
    "arrival",
    conversations=String(),
    ks=Integer(),
    senders=String(),
    client_ids=String(),
    bodies=Text(),
).render_derived(name="new")
_STORE_NEW_PG = (
    insert(Message)
    .from_select(
        ["conversation_id", "seq", "sender", "client_id", "body", "sent_at"],
        select(
            _new.c.conversations,
            _taken.c.last_seq - _taken.c.ns + _new.c.ks,
            _new.c.senders,
            _new.c.client_ids,
            _new.c.bodies,
            bindparam("sent_at", type_=UTCDateTime),
        )
        .join_from(_new, _taken, _taken.c.id == _new.c.conversations)
        # Rows get their pk in the order the SELECT yields them: keep it the arrival
        # order (a hash join would not), so pk rises with seq in every conversation.
        .order_by(_new.c.arrival),
    )
    .returning(col(Message.sender), col(Message.client_id), col(Message.seq))
    .add_cte(_taken)
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
    message: HistoryMessage, members: Mapping[str, Sequence[str]], *, duplicate: bool
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
