"""``persist_batch`` on real SQLite and PostgreSQL: one batch, many cases at once.

The bridge hands the store whatever queued up while the last batch committed, so
a batch mixes senders, conversations, resends (even of a message in the same batch)
and refusals. Each must come out as if the messages had been stored one by one.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col

from protocol import UpMessage, errors
from store import accounts
from store.messages import DirectConversations, direct_key, persist_batch
from store.tables import Conversation, Message


def up(id: str, to: str | None = None, conversation: str | None = None) -> UpMessage:
    return UpMessage(id=id, to=to, conversation=conversation, body=f"body of {id}")


def test_one_batch_mixing_new_resent_and_refused(store_engine: Engine) -> None:
    outcomes = persist_batch(
        store_engine,
        [
            ("alice", up("a1", to="bob")),
            ("bob", up("b1", to="alice")),
            ("alice", up("a1", to="bob")),  # resent before the first copy was stored
            ("alice", up("x1", to="nobody")),
            ("carol", up("c1", to="alice")),
            ("alice", up("a2", to="bob")),
        ],
    )
    a1, b1, a1_again, x1, c1, a2 = outcomes
    assert x1.error is not None
    assert x1.error.code == errors.UNKNOWN_RECIPIENT
    assert x1.error.id == "x1"
    for outcome in (a1, b1, a1_again, c1, a2):
        assert outcome.error is None
        assert outcome.stored is not None
    assert a1.stored
    assert b1.stored
    assert a1_again.stored
    assert c1.stored
    assert a2.stored
    # alice and bob share one conversation; seqs follow arrival order, gap-free.
    assert a1.stored.conversation == b1.stored.conversation == a2.stored.conversation
    assert [a1.stored.seq, b1.stored.seq, a2.stored.seq] == [1, 2, 3]
    assert a1.stored.members == ("alice", "bob")
    assert (a1.stored.duplicate, a1_again.stored.duplicate) == (False, True)
    assert (a1_again.stored.seq, a1_again.stored.conversation) == (1, a1.stored.conversation)
    assert c1.stored.conversation != a1.stored.conversation
    assert (c1.stored.seq, c1.stored.members) == (1, ("alice", "carol"))
    with Session(store_engine) as session:
        assert session.execute(select(func.count()).select_from(Message)).scalar_one() == 4

    # A later batch: resends come back with their stored seq, new ones continue it.
    again, a3 = persist_batch(
        store_engine, [("alice", up("a2", to="bob")), ("alice", up("a3", to="bob"))]
    )
    assert again.stored is not None
    assert (again.stored.seq, again.stored.duplicate) == (3, True)
    assert again.stored.body == "body of a2"
    assert a3.stored is not None
    assert (a3.stored.seq, a3.stored.duplicate) == (4, False)


def test_conversation_addressed_messages_need_membership(store_engine: Engine) -> None:
    (first,) = persist_batch(store_engine, [("alice", up("a1", to="bob"))])
    assert first.stored is not None
    conversation = first.stored.conversation
    outcomes = persist_batch(
        store_engine,
        [
            ("bob", up("b1", conversation=conversation)),
            ("carol", up("c1", conversation=conversation)),  # not a member
            ("carol", up("c2", conversation="c_doesnotexist")),
        ],
    )
    b1, c1, c2 = outcomes
    assert b1.stored is not None
    assert b1.stored.seq == 2
    for refused in (c1, c2):
        assert refused.error is not None
        assert refused.error.code == errors.UNKNOWN_CONVERSATION
    with Session(store_engine) as session:
        stored = session.execute(
            select(col(Message.client_id)).order_by(col(Message.seq))
        ).scalars()
        assert list(stored) == ["a1", "b1"]


def test_disabled_recipient_is_unknown(store_engine: Engine) -> None:
    with Session(store_engine) as session:
        accounts.set_disabled(session, "bob", True)
        session.commit()
    (outcome,) = persist_batch(store_engine, [("alice", up("a1", to="bob"))])
    assert outcome.error is not None
    assert outcome.error.code == errors.UNKNOWN_RECIPIENT


def _statements(engine: Engine) -> list[str]:
    """Every SQL statement ``engine`` sends from now on, in order."""
    sent: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    return sent


def test_known_direct_conversations_are_not_read_again(store_engine: Engine) -> None:
    directs = DirectConversations()
    (first,) = persist_batch(store_engine, [("alice", up("a1", to="bob"))], directs)
    assert first.stored is not None
    conversation = first.stored.conversation
    assert (directs.id_of(direct_key("alice", "bob")), directs.members_of(conversation)) == (
        conversation,
        ("alice", "bob"),
    )

    sent = _statements(store_engine)
    b1, a2, by_id, carol = persist_batch(
        store_engine,
        [
            ("bob", up("b1", to="alice")),
            ("alice", up("a2", conversation=conversation)),
            ("alice", up("a1", to="bob")),  # a resend, found in the database
            ("carol", up("c1", conversation=conversation)),  # not a member
        ],
        directs,
    )
    # Same answers as without the cache ...
    assert [o.stored.seq for o in (b1, a2, by_id) if o.stored] == [2, 3, 1]
    assert all(o.stored and o.stored.members == ("alice", "bob") for o in (b1, a2, by_id))
    assert carol.error is not None
    assert carol.error.code == errors.UNKNOWN_CONVERSATION
    # ... without reading the conversation or its members.
    lookups = [s for s in sent if "FROM conversations" in s or "FROM members" in s]
    assert lookups == []
    assert any("INSERT INTO messages" in s for s in sent)
    if store_engine.dialect.name == "postgresql":
        # The write finds the resend itself: the whole batch is one round trip.
        assert len(sent) == 1


def test_a_known_conversation_still_checks_its_recipient(store_engine: Engine) -> None:
    """A pair remembered while bob was enabled: disabling bob refuses what follows."""
    directs = DirectConversations()
    persist_batch(store_engine, [("alice", up("a1", to="bob"))], directs)
    persist_batch(store_engine, [("alice", up("a2", to="carol"))], directs)
    with Session(store_engine) as session:
        accounts.set_disabled(session, "bob", True)
        session.commit()
    a1, a3, a3_again, a4 = persist_batch(
        store_engine,
        [
            ("alice", up("a1", to="bob")),  # a resend is still answered with what was stored
            ("alice", up("a3", to="bob")),
            ("alice", up("a3", to="bob")),
            ("alice", up("a4", to="carol")),
        ],
        directs,
    )
    assert a1.stored is not None
    assert (a1.stored.seq, a1.stored.duplicate) == (1, True)
    for refused in (a3, a3_again):
        assert refused.error is not None
        assert (refused.error.code, refused.error.id) == (errors.UNKNOWN_RECIPIENT, "a3")
    assert a4.stored is not None
    assert (a4.stored.seq, a4.stored.members) == (2, ("alice", "carol"))
    with Session(store_engine) as session:
        stored = session.execute(select(col(Message.client_id)).order_by(col(Message.pk)))
        assert list(stored.scalars()) == ["a1", "a2", "a4"]


@pytest.mark.parametrize("remember", [True, False], ids=["known-directs", "read-first"])
def test_a_reused_id_with_other_content_is_refused(store_engine: Engine, remember: bool) -> None:
    """The id is the same message only with the same body and conversation.

    With ``known-directs`` PostgreSQL finds the stored row inside its one write; with
    ``read-first`` the batch's read finds it (SQLite always reads first).
    """

    def batch(*uplinks: tuple[str, UpMessage]) -> list[Any]:
        return persist_batch(store_engine, list(uplinks), directs if remember else None)

    directs = DirectConversations()
    (a1,) = batch(("alice", up("a1", to="bob")))
    (a2,) = batch(("alice", up("a2", to="carol")))
    assert a1.stored is not None
    assert a2.stored is not None
    same_by_to, same_by_id, other_body, other_to, other_conversation = batch(
        ("alice", up("a1", to="bob")),
        ("alice", up("a1", conversation=a1.stored.conversation)),
        ("alice", UpMessage(id="a1", to="bob", body="another text")),
        ("alice", up("a1", to="carol")),
        ("alice", up("a1", conversation=a2.stored.conversation)),
    )
    (unknown_to,) = batch(("alice", up("a1", to="nobody")))
    for resend in (same_by_to, same_by_id):
        assert resend.stored is not None
        assert (resend.stored.seq, resend.stored.duplicate) == (1, True)
        assert resend.stored.conversation == a1.stored.conversation
    for reused in (other_body, other_to, other_conversation, unknown_to):
        assert reused.error is not None
        assert (reused.error.code, reused.error.id) == (errors.ID_REUSED, "a1")
    with Session(store_engine) as session:
        stored = session.execute(select(col(Message.client_id), col(Message.body))).all()
    assert sorted(stored) == [("a1", "body of a1"), ("a2", "body of a2")]


def test_a_reused_id_within_one_batch_is_refused(store_engine: Engine) -> None:
    """The first copy is stored; a second copy in the same batch must match it."""
    first, again, other_body, other_to = persist_batch(
        store_engine,
        [
            ("alice", up("a1", to="bob")),
            ("alice", up("a1", to="bob")),
            ("alice", UpMessage(id="a1", to="bob", body="another text")),
            ("alice", up("a1", to="carol")),
        ],
    )
    assert first.stored is not None
    assert again.stored is not None
    assert (again.stored.seq, again.stored.duplicate) == (first.stored.seq, True)
    for reused in (other_body, other_to):
        assert reused.error is not None
        assert (reused.error.code, reused.error.id) == (errors.ID_REUSED, "a1")
    with Session(store_engine) as session:
        assert session.execute(select(func.count()).select_from(Message)).scalar_one() == 1


def test_a_failed_batch_teaches_nothing(store_engine: Engine) -> None:
    directs = DirectConversations()

    def fail_on_insert(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "INSERT INTO messages" in statement:
            raise OperationalError(statement, {}, Exception("connection lost"))

    event.listen(store_engine, "before_cursor_execute", fail_on_insert)
    with pytest.raises(OperationalError):
        persist_batch(store_engine, [("alice", up("a1", to="bob"))], directs)
    event.remove(store_engine, "before_cursor_execute", fail_on_insert)
    assert len(directs) == 0  # nothing is learnt from a batch that failed

    (again,) = persist_batch(store_engine, [("alice", up("a1", to="bob"))], directs)
    assert again.stored is not None
    assert (again.stored.seq, again.stored.duplicate) == (1, False)
    with Session(store_engine) as session:
        assert session.execute(select(func.count()).select_from(Conversation)).scalar_one() == 1
    assert directs.id_of(direct_key("alice", "bob")) == again.stored.conversation


def test_the_cache_is_bounded(store_engine: Engine) -> None:
    directs = DirectConversations(limit=1)
    persist_batch(store_engine, [("alice", up("a1", to="bob"))], directs)
    persist_batch(store_engine, [("alice", up("a2", to="carol"))], directs)
    assert len(directs) == 1
    assert directs.id_of(direct_key("alice", "bob")) is None
    # Forgotten is only slower: the next message finds the conversation again.
    (a3,) = persist_batch(store_engine, [("alice", up("a3", to="bob"))], directs)
    assert a3.stored is not None
    assert a3.stored.seq == 2


def test_rows_are_inserted_in_arrival_order(store_engine: Engine) -> None:
    """A batch's rows get their pk in arrival order: in every conversation pk rises with seq."""
    users = [f"user{i:02d}" for i in range(24)]
    with Session(store_engine) as session:
        for user in users:
            accounts.create(session, user, f"{user}-secret-pw")
        session.commit()
    # Round the pairs several times, so every conversation has several new messages.
    batch = [
        (
            users[2 * (n % 12) + (n // 12) % 2],
            up(f"m{n}", to=users[2 * (n % 12) + 1 - (n // 12) % 2]),
        )
        for n in range(240)
    ]
    for sender, message in batch[:12]:  # the conversations exist before the big batch
        persist_batch(store_engine, [(sender, message)])
    outcomes = persist_batch(store_engine, batch[12:])
    assert all(o.stored is not None for o in outcomes)
    with Session(store_engine) as session:
        rows = session.execute(
            select(col(Message.conversation_id), col(Message.seq), col(Message.client_id)).order_by(
                col(Message.pk)
            )
        ).all()
    assert [client_id for _, _, client_id in rows] == [m.id for _, m in batch]
    last: dict[str, int] = {}
    for conversation, seq, _ in rows:
        assert seq == last.get(conversation, 0) + 1
        last[conversation] = seq
