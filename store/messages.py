"""Persisting messages: dedupe on (sender, client id), seq in the committing transaction.

``persist_batch`` is the bridge's one write: a batch of uplinks is committed at
once (group commit; on PostgreSQL usually one statement). Within it each message is
handled in arrival order, so a sender's messages get increasing seqs in their
conversation.

Deciding what happens to each uplink is the same on both engines; how the batch
reaches the database is not, so each engine has its :class:`_Dialect`::

    persist_batch ─▶ dialect.connect     PostgreSQL: autocommit   SQLite: BEGIN IMMEDIATE
      ─▶ resends and recipients          (PostgreSQL skips it when every conversation is known)
      ─▶ dialect.create_directs ─▶ members (conversations named by id: locked, then
                                          from GroupMembers while members_seq holds)
      ─▶ _decide                         each uplink in arrival order: dedupe, refusals
      ─▶ dialect.store_new               PostgreSQL: one CTE      SQLite: UPDATE + INSERT
      ─▶ _outcomes
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Engine,
    insert,
    null,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from protocol import UpMessage, errors

from .history import MESSAGE_COLUMNS, HistoryMessage, to_history_message
from .tables import Account, Conversation, Member, MemberPeriod, Message
from .types import utcnow


@dataclass(frozen=True, slots=True)
class StoredMessage(HistoryMessage):
    """A committed message (or group event) and who must receive it."""

    #: Who receives it: the members whose periods hold its seq.
    members: tuple[str, ...] = field(kw_only=True)
    #: True when this uplink was already stored earlier (a resend).
    duplicate: bool = field(kw_only=True)


#: The fields a StoredMessage takes over from the HistoryMessage it is made of.
_HISTORY_FIELDS: Final = tuple(field.name for field in fields(HistoryMessage))


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


class GroupMembers:
    """What a writer has learnt of conversations' members, each as of a ``members_seq``.

    A group's members change, but only with a membership event, which moves the
    conversation's ``members_seq`` in the same transaction. A writer reads that
    number with the conversation row locked and uses what it kept only while it is
    unchanged, so a member removed by any writer is gone for the very next message,
    and a busy group costs no members read per batch. Bounded: everything is dropped
    when the members kept would pass ``limit`` names.
    """

    def __init__(self, limit: int = 1_000_000) -> None:
        self.limit = limit
        self._kept: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._names = 0

    def members_of(self, conversation: str, members_seq: int) -> tuple[str, ...] | None:
        kept = self._kept.get(conversation)
        return kept[1] if kept is not None and kept[0] == members_seq else None

    def learn(self, conversation: str, members_seq: int, members: tuple[str, ...]) -> None:
        if self._names + len(members) > self.limit:
            self._kept.clear()
            self._names = 0
        old = self._kept.get(conversation)
        self._names += len(members) - (len(old[1]) if old is not None else 0)
        self._kept[conversation] = (members_seq, members)


def persist_batch(
    engine: Engine,
    uplinks: Sequence[tuple[str, UpMessage]],
    directs: DirectConversations | None = None,
    groups: GroupMembers | None = None,
) -> list[Outcome]:
    """Store a batch of (sender, message) at once; one outcome per input.

    The batch costs a fixed number of statements, not a number per message: one read
    for resends and recipients, one each for direct conversations and members, and
    one write that takes the seqs of every conversation involved and inserts every
    new message. Messages are taken in arrival order, so a sender's messages get
    increasing seqs. With ``directs``, direct conversations it knows are not read
    again, and the ones this batch found or created are added to it once committed.
    How each engine commits the batch: :class:`_PostgreSQL`, :class:`_SQLite`.
    A conversation named by id (a group) is locked before its members are read, so
    a membership change committing meanwhile waits or is seen; with ``groups``, its
    members are read only when they changed.

    Rejections (unknown recipient, not a member) never undo the rest of the batch.
    If the write fails on a constraint (another bridge stored the same message at the
    same moment) the batch is replayed one message at a time, where dedupe then finds
    it.
    """
    if not uplinks:
        return []
    dialect = _dialect_of(engine)
    known = directs if directs is not None else DirectConversations()
    kept = groups if groups is not None else GroupMembers()
    locking = any(
        up.conversation is not None and known.members_of(up.conversation) is None
        for _, up in uplinks
    )
    try:
        with dialect.connect(engine, locking) as conn:
            outcomes, found, members = _persist(conn, dialect, uplinks, known, kept)
    except IntegrityError:
        if len(uplinks) == 1:
            raise
    else:
        if directs is not None:
            directs.learn(found, members)  # committed now
        return outcomes
    results: list[Outcome] = []
    for item in uplinks:
        results.extend(persist_batch(engine, [item], directs, groups))
    return results


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


#: What became of one uplink before the write: stored earlier, new, a resend of a
#: new one in the same batch, or refused.
_Decided = HistoryMessage | _New | _Again | errors.ProtocolError

#: What the write reports: the seq of each (sender, client id) it stored, and the
#: messages it found stored already (only a dialect whose write checks that).
_Written = tuple[dict[tuple[str, str], int], dict[tuple[str, str], HistoryMessage]]


class _Dialect(ABC):
    """How a batch reaches one database engine; what it decides is the same on all."""

    #: The write itself skips resends and messages to a missing or disabled account,
    #: so the read that finds them may be left out.
    checks_in_write: bool

    @abstractmethod
    def connect(self, engine: Engine, locking: bool) -> AbstractContextManager[Connection]:
        """The connection the batch is stored on, committed when it closes.

        ``locking``: the batch locks conversation rows (``FOR UPDATE``) that must stay
        locked until its write, so it needs one transaction.
        """

    @abstractmethod
    def create_directs(self, conn: Connection, pairs: dict[str, tuple[str, str]]) -> dict[str, str]:
        """The conversation id of each direct key, creating the missing ones."""

    @abstractmethod
    def store_new(
        self, conn: Connection, new: list[_New], counts: dict[str, int], now: datetime
    ) -> _Written:
        """Add the new messages of each conversation to its ``last_seq`` and insert them.

        ``new`` is not empty and in arrival order; ``counts`` has how many of them go
        to each conversation. A message's seq is its conversation's ``last_seq``
        before the batch plus its place ``k`` among the batch's new messages of that
        conversation. What is neither stored nor found stored already was refused
        (its recipient does not exist or is disabled).
        """


#: The whole write of a batch on PostgreSQL, one statement (so one round trip, and
#: atomic in autocommit). Arrays, not VALUES lists, so the text is the same for every
#: batch and psycopg prepares it once. ``fresh`` drops resends (``before``) and
#: messages to a missing or disabled account; ``taken`` adds each conversation's new
#: messages to its ``last_seq`` (locking the row, so concurrent writers queue there);
#: rows are inserted in arrival order so that pk rises with seq in every conversation
#: (a hash join would hand out pks in its own order).
_STORE_NEW_PG = """
WITH input AS (
    SELECT * FROM unnest(
        %(senders)s::text[], %(client_ids)s::text[], %(conversations)s::text[],
        %(recipients)s::text[], %(bodies)s::text[]
    ) WITH ORDINALITY AS i(sender, client_id, conversation_id, recipient, body, arrival)
), checked AS (
    SELECT i.*, m.seq AS stored_seq, m.conversation_id AS stored_conversation,
           m.body AS stored_body, m.sent_at AS stored_at, m.event AS stored_event,
           i.recipient IS NULL OR coalesce(r.enabled, false) AS deliverable
    FROM input i
    LEFT JOIN LATERAL (
        SELECT m.seq, m.conversation_id, m.body, m.sent_at, m.event FROM messages m
        WHERE m.sender = i.sender AND m.client_id = i.client_id LIMIT 1
    ) m ON true
    LEFT JOIN LATERAL (
        SELECT NOT a.disabled AS enabled FROM accounts a
        WHERE a.username = i.recipient LIMIT 1
    ) r ON true
), fresh AS (
    SELECT c.*, row_number() OVER (PARTITION BY c.conversation_id ORDER BY c.arrival) AS k
    FROM checked c WHERE c.stored_seq IS NULL AND c.deliverable
), counts AS (
    SELECT conversation_id, count(*) AS n FROM fresh GROUP BY conversation_id
), taken AS (
    UPDATE conversations c SET last_seq = c.last_seq + counts.n
    FROM counts WHERE c.id = counts.conversation_id
    RETURNING c.id, c.last_seq, counts.n
), stored AS (
    INSERT INTO messages (conversation_id, seq, sender, client_id, body, sent_at)
    SELECT f.conversation_id, t.last_seq - t.n + f.k, f.sender, f.client_id, f.body,
           %(sent_at)s
    FROM fresh f JOIN taken t ON t.id = f.conversation_id
    ORDER BY f.arrival
    RETURNING client_id, sender, seq
)
SELECT true, client_id, NULL, seq, sender, NULL, NULL, NULL FROM stored
UNION ALL
SELECT false, client_id, stored_conversation, stored_seq, sender, stored_body, stored_at,
       stored_event
FROM checked WHERE stored_seq IS NOT NULL
"""


class _PostgreSQL(_Dialect):
    """A batch whose conversations are all known is one statement: one round trip.

    Each statement is its own transaction (autocommit): the write is a single
    statement, so its seqs and rows commit together or not at all, and it skips
    resends and messages to a missing or disabled account by itself. The reads run
    only for a batch with a conversation to find or create; they are what a
    transaction at READ COMMITTED would see too, and a new conversation is created
    with its members in a transaction of its own. A batch that names conversations
    by id runs in one transaction instead: it locks their rows before reading their
    members and keeps them locked until its write commits.
    """

    checks_in_write = True

    @contextmanager
    def connect(self, engine: Engine, locking: bool) -> Iterator[Connection]:
        if locking:
            with engine.begin() as conn:
                yield conn
            return
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn

    def create_directs(self, conn: Connection, pairs: dict[str, tuple[str, str]]) -> dict[str, str]:
        if not pairs:
            return {}
        with conn.engine.begin() as creating:
            return _create_directs(creating, pairs, postgresql.insert)

    def store_new(
        self, conn: Connection, new: list[_New], counts: dict[str, int], now: datetime
    ) -> _Written:
        rows = conn.exec_driver_sql(
            _STORE_NEW_PG,
            {
                "senders": [item.sender for item in new],
                "client_ids": [item.up.id for item in new],
                "conversations": [item.conversation for item in new],
                "recipients": [item.up.to for item in new],
                "bodies": [item.up.body for item in new],
                "sent_at": now,
            },
        ).all()
        seqs: dict[tuple[str, str], int] = {}
        resent: dict[tuple[str, str], HistoryMessage] = {}
        for is_new, client_id, conversation, seq, sender, body, sent_at, event in rows:
            if is_new:
                seqs[sender, client_id] = seq
            else:
                resent[sender, client_id] = HistoryMessage(
                    client_id, conversation, seq, sender, body, sent_at.astimezone(UTC), event
                )
        return seqs, resent


class _SQLite(_Dialect):
    """In-process, so no round trips to save: the batch is one transaction, reads first.

    ``BEGIN IMMEDIATE`` (see :mod:`store.db`) takes the write lock at the start, so
    the ``last_seq`` read and written here cannot interleave with another writer.
    """

    checks_in_write = False

    @contextmanager
    def connect(self, engine: Engine, locking: bool) -> Iterator[Connection]:
        with engine.begin() as conn:
            yield conn

    def create_directs(self, conn: Connection, pairs: dict[str, tuple[str, str]]) -> dict[str, str]:
        return _create_directs(conn, pairs, sqlite.insert)

    def store_new(
        self, conn: Connection, new: list[_New], counts: dict[str, int], now: datetime
    ) -> _Written:
        # SQLite cannot name a VALUES list's columns, so no single statement like
        # PostgreSQL's; one short statement per conversation costs no round trips.
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
            (item.sender, item.up.id): last_seq[item.conversation]
            - counts[item.conversation]
            + item.k
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
        return seqs, {}


_DIALECTS: Final[dict[str, _Dialect]] = {"postgresql": _PostgreSQL(), "sqlite": _SQLite()}


def _dialect_of(engine: Engine) -> _Dialect:
    try:
        return _DIALECTS[engine.dialect.name]
    except KeyError:
        raise ValueError(f"messages cannot be stored on {engine.dialect.name!r}") from None


def _persist(
    conn: Connection,
    dialect: _Dialect,
    uplinks: Sequence[tuple[str, UpMessage]],
    known: DirectConversations,
    kept: GroupMembers,
) -> tuple[list[Outcome], dict[str, str], dict[str, Sequence[str]]]:
    """The outcomes, and the direct conversations read or created here with their members."""
    # 1. Resends (messages of this batch stored already) and the recipients that
    #    exist and are enabled: None when not read, because the write checks both.
    stored_before: dict[tuple[str, str], HistoryMessage] = {}
    stored_directs: dict[str, str] = {}
    recipients: set[str] | None = None
    if not (dialect.checks_in_write and all(_known(sender, up, known) for sender, up in uplinks)):
        stored_before, stored_directs, recipients = _resends_and_recipients(conn, uplinks)

    # 2. The direct conversations of those recipients: known ones from ``known``.
    pairs = {
        direct_key(sender, up.to): (sender, up.to)
        for sender, up in uplinks
        if up.to is not None
        and (recipients is None or up.to in recipients)
        and (sender, up.id) not in stored_before
    }
    direct = {pair: cid for pair in pairs if (cid := known.id_of(pair)) is not None}
    found = dialect.create_directs(
        conn, {pair: users for pair, users in pairs.items() if pair not in direct}
    )
    direct.update(found)

    # 3. Members of every conversation written to: membership checks and routing.
    involved = set(direct.values())
    involved |= {up.conversation for _, up in uplinks if up.conversation is not None}
    members = _members(conn, involved, known, kept)

    # 4. Decide each uplink in arrival order.
    decided, new_in = _decide(uplinks, stored_before, stored_directs, recipients, direct, members)

    # 5. Take the seqs and store the new messages; the write also finds the resends
    #    and refused recipients that step 1 did not read.
    now = utcnow()
    new = [item for item in decided if isinstance(item, _New)]
    seqs, resent = dialect.store_new(conn, new, new_in, now) if new else ({}, {})
    again = {(m.conversation, m.seq) for m in (*stored_before.values(), *resent.values())}
    readers = recipients_at(conn, again, known)
    return _outcomes(decided, seqs, resent, members, readers, now), found, members


def _known(sender: str, up: UpMessage, known: DirectConversations) -> bool:
    """Whether ``known`` has the uplink's conversation and its members."""
    if up.to is not None:
        return known.id_of(direct_key(sender, up.to)) is not None
    return up.conversation is not None and known.members_of(up.conversation) is not None


def _decide(
    uplinks: Sequence[tuple[str, UpMessage]],
    stored_before: Mapping[tuple[str, str], HistoryMessage],
    stored_directs: Mapping[str, str],
    recipients: set[str] | None,
    direct: Mapping[str, str],
    members: Mapping[str, Sequence[str]],
) -> tuple[list[_Decided], dict[str, int]]:
    """What becomes of each uplink, in arrival order, and how many new ones each
    conversation gets."""
    decided: list[_Decided] = []
    first_copy: dict[tuple[str, str], int] = {}
    new_in: dict[str, int] = {}
    for index, (sender, up) in enumerate(uplinks):
        key = (sender, up.id)
        if key in stored_before:
            # The same message is the same body in the same conversation, named by
            # ``to`` or by ``conversation``: anything else is a new message under an
            # old id. Compared only here, for the rows that hit a stored id.
            before = stored_before[key]
            if up.to is not None:
                same_target = stored_directs.get(before.conversation) == direct_key(sender, up.to)
            else:
                same_target = before.conversation == up.conversation
            same = same_target and before.body == up.body and before.event is None
            decided.append(before if same else _id_reused(up))
        elif key in first_copy:
            original = decided[first_copy[key]]
            assert isinstance(original, _New)
            target = direct.get(direct_key(sender, up.to)) if up.to else up.conversation
            same = (original.conversation, original.up.body) == (target, up.body)
            decided.append(_Again(first_copy[key]) if same else _id_reused(up))
        elif up.to is not None and recipients is not None and up.to not in recipients:
            decided.append(_unknown_recipient(up))
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
    return decided, new_in


def _outcomes(
    decided: list[_Decided],
    seqs: Mapping[tuple[str, str], int],
    resent: Mapping[tuple[str, str], HistoryMessage],
    members: Mapping[str, Sequence[str]],
    readers: Mapping[tuple[str, int], tuple[str, ...]],
    now: datetime,
) -> list[Outcome]:
    """One outcome per decided uplink, with what the write reported."""
    outcomes: list[Outcome] = []
    for item in decided:
        if isinstance(item, errors.ProtocolError):
            outcomes.append(Outcome(error=item))
        elif isinstance(item, _Again):
            first = outcomes[item.first]
            again = first.stored
            outcomes.append(
                first if again is None else Outcome(stored=replace(again, duplicate=True))
            )
        elif isinstance(item, _New):
            key = (item.sender, item.up.id)
            if key in seqs:
                stored = StoredMessage(
                    item.up.id,
                    item.conversation,
                    seqs[key],
                    item.sender,
                    item.up.body,
                    now,
                    members=tuple(members[item.conversation]),
                    duplicate=False,
                )
                outcomes.append(Outcome(stored=stored))
            elif key in resent:
                before = resent[key]
                same = (before.body, before.conversation) == (item.up.body, item.conversation)
                if same and before.event is None:
                    outcomes.append(Outcome(stored=found_again(before, readers)))
                else:
                    outcomes.append(Outcome(error=_id_reused(item.up)))
            elif item.up.to is not None:
                outcomes.append(Outcome(error=_unknown_recipient(item.up)))
            else:
                # A conversation row missing (they are never deleted). The uplinks are
                # not acknowledged, so they come back, and what was stored is found then.
                raise RuntimeError(f"conversation {item.conversation!r} not found")
        else:
            outcomes.append(Outcome(stored=found_again(item, readers)))
    return outcomes


def _resends_and_recipients(
    conn: Connection, uplinks: Sequence[tuple[str, UpMessage]]
) -> tuple[dict[tuple[str, str], HistoryMessage], dict[str, str], set[str]]:
    """The batch's messages stored already, and its recipients that exist and are enabled.

    Also the direct key of each stored message's conversation (where it is a direct
    one), so that a resend naming ``to`` can be compared with what was stored. One
    read; an account row has no client id.
    """
    keys = sorted({(sender, up.id) for sender, up in uplinks})
    wanted = sorted({up.to for _, up in uplinks if up.to is not None})
    resends = (
        select(*MESSAGE_COLUMNS, col(Conversation.direct_key))
        .join(Conversation, col(Conversation.id) == col(Message.conversation_id))
        .where(tuple_(col(Message.sender), col(Message.client_id)).in_(keys))
    )
    blanks = [null()] * (len(MESSAGE_COLUMNS) - 3)
    accounts = select(null(), null(), null(), col(Account.username), *blanks).where(
        col(Account.username).in_(wanted), ~col(Account.disabled)
    )
    read = resends.union_all(accounts) if wanted else resends
    stored_before: dict[tuple[str, str], HistoryMessage] = {}
    stored_directs: dict[str, str] = {}
    recipients: set[str] = set()
    for row in conn.execute(read):
        if row.client_id is None:
            recipients.add(row.sender)
            continue
        stored_before[row.sender, row.client_id] = to_history_message(row[: len(MESSAGE_COLUMNS)])
        if row.direct_key is not None:
            stored_directs[row.conversation_id] = row.direct_key
    return stored_before, stored_directs, recipients


def _members(
    conn: Connection, conversations: set[str], known: DirectConversations, kept: GroupMembers
) -> dict[str, Sequence[str]]:
    """Members of each conversation that exists: from ``known``, else locked and checked.

    A conversation ``known`` does not hold (a group, or a direct one named by id) has
    its row locked until the batch commits and its ``members_seq`` read: its members
    come from ``kept`` while that is unchanged, else from one read of every such
    conversation.
    """
    members: dict[str, Sequence[str]] = {
        cid: cached for cid in conversations if (cached := known.members_of(cid)) is not None
    }
    unknown = sorted(conversations - members.keys())
    if not unknown:
        return members
    versions: dict[str, int] = {
        conversation: version
        for conversation, version in conn.execute(
            select(col(Conversation.id), col(Conversation.members_seq))
            .where(col(Conversation.id).in_(unknown))
            .order_by(col(Conversation.id))
            .with_for_update()
        )
    }
    stale = []
    for conversation, version in versions.items():
        cached = kept.members_of(conversation, version)
        if cached is None:
            stale.append(conversation)
        else:
            members[conversation] = cached
    if stale:
        looked_up: dict[str, list[str]] = {conversation: [] for conversation in stale}
        for conversation, username in conn.execute(
            select(col(Member.conversation_id), col(Member.username))
            .where(col(Member.conversation_id).in_(stale))
            .order_by(col(Member.conversation_id), col(Member.username))
        ):
            looked_up[conversation].append(username)
        for conversation, names in looked_up.items():
            kept.learn(conversation, versions[conversation], tuple(names))
            members[conversation] = tuple(names)
    return members


def recipients_at(
    conn: Connection, stored: set[tuple[str, int]], known: DirectConversations | None = None
) -> dict[tuple[str, int], tuple[str, ...]]:
    """Who receives each stored (conversation, seq): the users whose periods hold it.

    For a message found again (a resend): a member added since must not receive what
    came before them, one removed since still receives what they had. Direct
    conversations ``known`` holds never change members and cost no read.
    """
    readers: dict[tuple[str, int], tuple[str, ...]] = {}
    for conversation, seq in stored:
        cached = known.members_of(conversation) if known is not None else None
        if cached is not None:
            readers[conversation, seq] = tuple(cached)
    wanted = sorted({conversation for conversation, _ in stored} - {c for c, _ in readers})
    if not wanted:
        return readers
    periods: dict[str, list[tuple[str, int, int | None]]] = {}
    for conversation, username, first_seq, last_seq in conn.execute(
        select(
            col(MemberPeriod.conversation_id),
            col(MemberPeriod.username),
            col(MemberPeriod.first_seq),
            col(MemberPeriod.last_seq),
        ).where(col(MemberPeriod.conversation_id).in_(wanted))
    ):
        periods.setdefault(conversation, []).append((username, first_seq, last_seq))
    for conversation, seq in stored - readers.keys():
        readers[conversation, seq] = tuple(
            sorted(
                {
                    username
                    for username, first_seq, last_seq in periods.get(conversation, ())
                    if first_seq <= seq and (last_seq is None or seq <= last_seq)
                }
            )
        )
    return readers


def _id_reused(up: UpMessage) -> errors.ProtocolError:
    """A stored id sent again with another body or target: not a resend, so refused.

    Answering it with the stored message would tell the client its new text was
    delivered when it never was.
    """
    return errors.ProtocolError(
        errors.ID_REUSED,
        f"id {up.id!r} is already a message of yours with another body or recipient; "
        "a new message needs a new id",
        id=up.id,
    )


def _unknown_recipient(up: UpMessage) -> errors.ProtocolError:
    return errors.ProtocolError(errors.UNKNOWN_RECIPIENT, f"no user {up.to!r}", id=up.id)


def _create_directs(
    conn: Connection,
    pairs: dict[str, tuple[str, str]],
    insert_ignoring: Callable[[type[Conversation]], Any],
) -> dict[str, str]:
    """The conversation id of each direct key, creating the ones that do not exist yet.

    ``insert_ignoring`` is the dialect's ``insert`` (the one with ``ON CONFLICT DO
    NOTHING``): another writer may create the same pair's conversation meanwhile.
    """
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
        conn.execute(
            insert(MemberPeriod),
            [
                {"conversation_id": row["conversation_id"], "username": row["username"]}
                | {"first_seq": 1, "last_seq": None}
                for row in member_rows
            ],
        )
    return found


def found_again(
    message: HistoryMessage, readers: Mapping[tuple[str, int], tuple[str, ...]]
) -> StoredMessage:
    """A message (or event) stored earlier, found again for a resend."""
    return StoredMessage(
        **{name: getattr(message, name) for name in _HISTORY_FIELDS},
        members=readers[message.conversation, message.seq],
        duplicate=True,
    )
