"""Group rules in the store, on SQLite and PostgreSQL: events, windows, every refusal.

The same rules end to end, through both brokers, are in ``tests/test_groups.py``;
here each rule is checked where it is decided, fast, with nothing but a database.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlmodel import Session

from protocol import UpGroup, UpMessage, errors
from store import history, make_engine, migrate, search
from store.groups import apply_op
from store.messages import GroupMembers, Outcome, StoredMessage, persist_batch
from store.tables import Account

from .support.stack import template_copy

_ids = iter(range(1, 1_000_000))


USERS = ("alice", "bob", "carol", "dave", "erin")


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("groups") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[Engine]:
    """A fresh migrated database with :data:`USERS`. The accounts are rows without a
    usable password: these tests never sign in, and hashing five passwords per test
    cost more than everything else they do."""
    if request.param == "sqlite":
        shutil.copy(sqlite_template, tmp_path / "groups.db")
        url = f"sqlite:///{tmp_path / 'groups.db'}"
    else:
        url = template_copy(request.getfixturevalue("postgres"), "groups")
    engine = make_engine(url)
    with Session(engine) as session:
        session.add_all(Account(username=user, password_hash="-") for user in USERS)
        session.commit()
    yield engine
    engine.dispose()


def op(engine: Engine, sender: str, kind: str, max_members: int = 1024, **fields: Any) -> Outcome:
    fields.setdefault("id", f"op-{next(_ids)}")
    return apply_op(engine, sender, UpGroup(op=kind, **fields), max_members)


def ok(outcome: Outcome) -> StoredMessage:
    assert outcome.error is None, outcome.error
    assert outcome.stored is not None
    return outcome.stored


def refused(outcome: Outcome) -> str:
    assert outcome.stored is None, outcome.stored
    assert outcome.error is not None
    return outcome.error.code


def send(
    engine: Engine, sender: str, conversation: str, body: str, groups: GroupMembers | None = None
) -> Outcome:
    up = UpMessage(id=f"m-{next(_ids)}", conversation=conversation, body=body)
    (outcome,) = persist_batch(engine, [(sender, up)], groups=groups)
    return outcome


def create(engine: Engine, *members: str, name: str = "team") -> str:
    return ok(op(engine, "alice", "create", name=name, members=list(members))).conversation


def seqs_of(engine: Engine, user: str, conversation: str) -> list[int] | None:
    with Session(engine) as session:
        page = history.page(session, user, conversation, after=0, limit=200)
    return None if page is None else [m.seq for m in page.messages]


def test_create_is_seq_1_with_every_member_and_the_creator_admin(db: Engine) -> None:
    created = ok(op(db, "alice", "create", name="team", members=["bob", "carol", "bob"]))

    assert (created.seq, created.event, created.sender) == (1, "created", "alice")
    assert created.members == ("alice", "bob", "carol")
    down = created.down()
    assert (down.event, down.users, down.name) == ("created", ["bob", "carol"], "team")
    assert down.body == 'alice created the group "team"'
    with Session(db) as session:
        roles = history.members(session, "bob", created.conversation)
    assert roles is not None
    assert [(m.username, m.role, m.since_seq) for m in roles] == [
        ("alice", "admin", 1),
        ("bob", "member", 1),
        ("carol", "member", 1),
    ]


def test_a_resent_op_is_the_same_event_and_another_op_under_its_id_is_refused(
    db: Engine,
) -> None:
    first = ok(op(db, "alice", "create", id="g1", name="team", members=["bob"]))
    again = ok(op(db, "alice", "create", id="g1", name="team", members=["bob"]))
    assert (again.conversation, again.seq, again.duplicate) == (first.conversation, 1, True)
    assert again.members == first.members

    added = ok(op(db, "alice", "add", id="a1", conversation=first.conversation, members=["carol"]))
    resent = ok(op(db, "alice", "add", id="a1", conversation=first.conversation, members=["carol"]))
    assert (resent.seq, resent.duplicate) == (added.seq, True)
    assert refused(
        op(db, "alice", "rename", id="a1", conversation=first.conversation, name="x")
    ) == (errors.ID_REUSED)
    # An up/msg under an op's id is not a resend of it either.
    up = UpMessage(id="a1", conversation=first.conversation, body=added.body)
    (outcome,) = persist_batch(db, [("alice", up)])
    assert refused(outcome) == errors.ID_REUSED


def test_a_member_added_at_seq_n_reads_from_n_on(db: Engine) -> None:
    group = create(db, "bob")
    ok(send(db, "bob", group, "before carol"))  # seq 2
    added = ok(op(db, "alice", "add", conversation=group, members=["carol"]))  # seq 3
    assert (added.seq, added.members) == (3, ("alice", "bob", "carol"))
    after = ok(send(db, "alice", group, "welcome carol"))  # seq 4
    assert after.members == ("alice", "bob", "carol")

    assert seqs_of(db, "carol", group) == [3, 4]
    assert seqs_of(db, "bob", group) == [1, 2, 3, 4]
    with Session(db) as session:
        assert history.find_message(session, "carol", after.client_id) is not None
        assert history.find_message(session, "carol", "m-does-not-exist") is None
        found = [m.body for m in search.search(session, "carol", "carol")]
        assert found == ["welcome carol"]  # not "before carol", and no event text
        (summary,) = history.conversations_of(session, "carol")
    assert (summary.kind, summary.name, summary.member, summary.unread) == (
        "group",
        "team",
        True,
        1,
    )


def test_a_removed_member_keeps_what_they_had_and_gets_nothing_after(db: Engine) -> None:
    groups = GroupMembers()  # one cache throughout, as the bridge keeps it
    group = create(db, "bob", "carol")
    ok(send(db, "carol", group, "carol was here", groups))  # seq 2
    ok(send(db, "alice", group, "warm the cache", groups))  # seq 3
    removed = ok(op(db, "alice", "remove", conversation=group, members=["carol"]))  # seq 4
    assert removed.members == ("alice", "bob", "carol")  # carol sees her removal
    assert removed.down().users == ["carol"]

    after = ok(send(db, "alice", group, "after carol", groups))  # seq 5
    assert after.members == ("alice", "bob")
    assert refused(send(db, "carol", group, "let me back", groups)) == errors.UNKNOWN_CONVERSATION
    assert refused(op(db, "carol", "leave", conversation=group)) == errors.UNKNOWN_CONVERSATION

    assert seqs_of(db, "carol", group) == [1, 2, 3, 4]
    with Session(db) as session:
        assert history.find_message(session, "carol", after.client_id) is None
        assert history.members(session, "carol", group) is None
        (summary,) = history.conversations_of(session, "carol")
    assert (summary.member, summary.members) == (False, ())
    assert summary.last_message is not None
    assert summary.last_message.seq == 4

    # Added again: each period, not the gap.
    ok(op(db, "alice", "add", conversation=group, members=["carol"]))  # seq 6
    ok(send(db, "bob", group, "carol is back", groups))  # seq 7
    assert seqs_of(db, "carol", group) == [1, 2, 3, 4, 6, 7]


def test_a_busy_group_costs_no_members_read_per_message(db: Engine) -> None:
    """The writer keeps a group's members while its members_seq holds; a change made
    by anyone (here without the cache) is seen by the very next message."""
    groups = GroupMembers()
    group = create(db, "bob", "carol")
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if re.search(r"\bFROM members\b", statement):
            reads.append(statement)

    event.listen(db, "before_cursor_execute", count)
    try:
        for n in range(5):
            assert ok(send(db, "alice", group, f"busy {n}", groups)).members == (
                "alice",
                "bob",
                "carol",
            )
        assert len(reads) == 1
        ok(op(db, "alice", "remove", conversation=group, members=["carol"]))
        reads.clear()
        assert ok(send(db, "alice", group, "after carol", groups)).members == ("alice", "bob")
        assert len(reads) == 1
    finally:
        event.remove(db, "before_cursor_execute", count)


def test_a_resend_after_a_change_reaches_who_received_it_first(db: Engine) -> None:
    group = create(db, "bob", "carol")
    up = UpMessage(id="early", conversation=group, body="before the change")
    (first,) = persist_batch(db, [("alice", up)])
    ok(op(db, "alice", "remove", conversation=group, members=["carol"]))
    ok(op(db, "alice", "add", conversation=group, members=["dave"]))

    (again,) = persist_batch(db, [("alice", up)])
    assert ok(again).duplicate
    assert ok(again).members == ok(first).members == ("alice", "bob", "carol")


def test_the_last_admin_leaving_makes_the_longest_member_admin(db: Engine) -> None:
    group = create(db, "carol", "bob")
    ok(op(db, "alice", "add", conversation=group, members=["dave"]))
    left = ok(op(db, "alice", "leave", conversation=group))

    assert left.down().promoted == ["bob"]  # in since seq 1, first by name
    assert left.members == ("alice", "bob", "carol", "dave")
    with Session(db) as session:
        roles = history.members(session, "bob", group)
    assert roles is not None
    assert {m.username: m.role for m in roles} == {
        "bob": "admin",
        "carol": "member",
        "dave": "member",
    }
    # An admin remains: another leaving promotes nobody.
    assert ok(op(db, "carol", "leave", conversation=group)).down().promoted is None


def test_admins_promote_demote_and_rename(db: Engine) -> None:
    group = create(db, "bob", "carol")
    assert refused(op(db, "bob", "rename", conversation=group, name="mine")) == errors.FORBIDDEN
    ok(op(db, "alice", "promote", conversation=group, members=["bob"]))
    renamed = ok(op(db, "bob", "rename", conversation=group, name="ours"))
    assert (renamed.down().event, renamed.down().name) == ("renamed", "ours")
    ok(op(db, "bob", "demote", conversation=group, members=["alice"]))
    assert refused(op(db, "alice", "add", conversation=group, members=["dave"])) == (
        errors.FORBIDDEN
    )
    with Session(db) as session:
        (summary,) = history.conversations_of(session, "carol")
    assert summary.name == "ours"


@pytest.mark.parametrize(
    ("sender", "kind", "fields", "code"),
    [
        ("dave", "add", {"members": ["erin"]}, errors.UNKNOWN_CONVERSATION),
        ("dave", "leave", {}, errors.UNKNOWN_CONVERSATION),
        ("bob", "add", {"members": ["dave"]}, errors.FORBIDDEN),
        ("bob", "remove", {"members": ["carol"]}, errors.FORBIDDEN),
        ("bob", "promote", {"members": ["carol"]}, errors.FORBIDDEN),
        ("bob", "demote", {"members": ["alice"]}, errors.FORBIDDEN),
        ("bob", "rename", {"name": "x"}, errors.FORBIDDEN),
        ("alice", "add", {"members": ["nobody"]}, errors.UNKNOWN_USER),
        ("alice", "add", {"members": ["dave", "bob"]}, errors.ALREADY_MEMBER),
        ("alice", "add", {"members": ["alice"]}, errors.ALREADY_MEMBER),
        ("alice", "remove", {"members": ["dave"]}, errors.NOT_MEMBER),
        ("alice", "remove", {"members": ["alice"]}, errors.INVALID_PAYLOAD),
        ("alice", "promote", {"members": ["dave"]}, errors.NOT_MEMBER),
        ("alice", "promote", {"members": ["alice"]}, errors.ALREADY_ADMIN),
        ("alice", "demote", {"members": ["bob"]}, errors.NOT_ADMIN),
        ("alice", "demote", {"members": ["alice"]}, errors.LAST_ADMIN),
    ],
)
def test_refusals_store_nothing(
    db: Engine, sender: str, kind: str, fields: dict[str, Any], code: str
) -> None:
    group = create(db, "bob", "carol")
    assert refused(op(db, sender, kind, conversation=group, **fields)) == code
    assert seqs_of(db, "alice", group) == [1]


def test_ops_on_no_group_are_unknown_conversation(db: Engine) -> None:
    (direct,) = persist_batch(db, [("alice", UpMessage(id="d1", to="bob", body="hi"))])
    direct_id = ok(direct).conversation
    assert refused(op(db, "alice", "add", conversation=direct_id, members=["carol"])) == (
        errors.UNKNOWN_CONVERSATION
    )
    assert refused(op(db, "alice", "leave", conversation="c_nothing")) == (
        errors.UNKNOWN_CONVERSATION
    )


def test_group_full_counts_every_member(db: Engine) -> None:
    assert refused(
        op(db, "alice", "create", name="t", members=["bob", "carol"], max_members=2)
    ) == (errors.GROUP_FULL)
    group = ok(op(db, "alice", "create", name="t", members=["bob"], max_members=3)).conversation
    assert refused(
        op(db, "alice", "add", conversation=group, members=["carol", "dave"], max_members=3)
    ) == (errors.GROUP_FULL)
    ok(op(db, "alice", "add", conversation=group, members=["carol"], max_members=3))
    assert refused(op(db, "alice", "create", name="t", members=["nobody"])) == errors.UNKNOWN_USER
