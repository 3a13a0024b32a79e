"""``persist_batch`` on real SQLite and PostgreSQL: one batch, many cases at once.

The bridge hands the store whatever queued up while the last batch committed, so
a batch mixes senders, conversations, resends (even of a message in the same batch)
and refusals. Each must come out as if the messages had been stored one by one.
"""

from __future__ import annotations

from sqlalchemy import Engine, func, select
from sqlmodel import Session, col

from protocol import UpMessage, errors
from store import accounts
from store.messages import persist_batch
from store.tables import Message


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
        account = accounts.get(session, "bob")
        assert account is not None
        account.disabled = True
        session.add(account)
        session.commit()
    (outcome,) = persist_batch(store_engine, [("alice", up("a1", to="bob"))])
    assert outcome.error is not None
    assert outcome.error.code == errors.UNKNOWN_RECIPIENT
