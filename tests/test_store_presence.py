"""``presence.update_batch`` on real SQLite and PostgreSQL: a batch of announcements.

A user is online while any device is; each announcement in a batch is judged after
the ones before it, and the devices' last words are what is stored.
"""

from __future__ import annotations

from sqlalchemy import Engine, func, select
from sqlmodel import Session, col

from protocol import UpGroup, UpMessage, UpPresence
from store import accounts, presence
from store.groups import apply_op
from store.messages import DirectConversations, GroupMembers, persist_batch
from store.tables import Device


def word(device: str, state: str) -> UpPresence:
    return UpPresence.model_validate({"device": device, "state": state})


def test_a_batch_is_judged_in_order_and_stores_each_devices_last_word(
    store_engine: Engine,
) -> None:
    states = presence.update_batch(
        store_engine,
        [
            ("alice", word("phone", "online")),
            ("alice", word("laptop", "online")),
            ("bob", word("phone", "online")),
            ("alice", word("phone", "offline")),
            ("alice", word("laptop", "offline")),
            ("bob", word("phone", "offline")),
            ("bob", word("phone", "online")),
        ],
    )
    assert [(s.user, s.online, s.changed) for s in states] == [
        ("alice", True, True),
        ("alice", True, False),  # already online through the phone
        ("bob", True, True),
        ("alice", True, False),  # the laptop is still online
        ("alice", False, True),
        ("bob", False, True),
        ("bob", True, True),
    ]
    with Session(store_engine) as session:
        rows = session.execute(
            select(col(Device.username), col(Device.device), col(Device.online)).order_by(
                col(Device.username), col(Device.device)
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("alice", "laptop", False),
        ("alice", "phone", False),
        ("bob", "phone", True),
    ]

    # The next batch starts from what was stored.
    (again,) = presence.update_batch(store_engine, [("alice", word("tablet", "online"))])
    assert (again.online, again.changed) == (True, True)
    (steady,) = presence.update_batch(store_engine, [("bob", word("phone", "online"))])
    assert (steady.online, steady.changed) == (True, False)


# -- contacts: who hears of a user's presence --------------------------------------


def _chat(engine: Engine, sender: str, to: str) -> None:
    up = UpMessage.model_validate({"id": f"{sender}-{to}", "to": to, "body": "hi"})
    persist_batch(engine, [(sender, up)], directs=DirectConversations(), groups=GroupMembers())


def _group(engine: Engine, admin: str, *members: str) -> None:
    op = UpGroup.model_validate(
        {"id": f"g-{len(members)}", "op": "create", "name": "g", "members": list(members)}
    )
    assert apply_op(engine, admin, op).error is None


def test_contacts_are_1to1_partners_first_then_small_groups(store_engine: Engine) -> None:
    with Session(store_engine) as session:
        for user in ("dave", "erin", "frank"):
            accounts.create(session, user, "a-long-password")
        session.commit()
    _chat(store_engine, "alice", "carol")
    _group(store_engine, "alice", "bob", "dave")  # three members: a small group
    _group(store_engine, "erin", "alice", "frank", "bob", "carol")  # five: too large at 4
    with Session(store_engine) as session:
        found = presence.contacts(session, ["alice", "bob", "frank", "nobody"], group_limit=4)
        assert found == {
            "alice": ["carol", "bob", "dave"],
            "bob": ["alice", "dave"],
            "frank": [],  # only in the large group
            "nobody": [],
        }
        everyone = presence.contacts(session, ["alice"], group_limit=5)
        assert everyone["alice"] == ["carol", "bob", "dave", "erin", "frank"]
        assert presence.contacts(session, ["alice"], group_limit=0) == {"alice": ["carol"]}
        assert presence.contacts(session, ["alice"], max_contacts=2) == {"alice": ["carol", "bob"]}
        assert presence.is_contact(session, "bob", "dave", group_limit=4)
        assert not presence.is_contact(session, "frank", "alice", group_limit=4)
        assert presence.is_contact(session, "frank", "frank", group_limit=4)


def test_states_say_what_the_history_api_says(store_engine: Engine) -> None:
    presence.update_batch(
        store_engine,
        [("alice", word("phone", "online")), ("bob", word("phone", "online"))],
    )
    presence.update_batch(store_engine, [("bob", word("phone", "offline"))])
    with Session(store_engine) as session:
        found = presence.states(session, ["alice", "bob", "carol"])
        seen = session.exec(select(func.max(Device.last_seen))).one()
    assert set(found) == {"alice", "bob"}  # carol was never seen
    assert found["alice"][0]
    assert not found["bob"][0]
    assert found["bob"][1] == seen[0]


def test_came_online_only_for_a_device_that_was_not(store_engine: Engine) -> None:
    first, again, other = presence.update_batch(
        store_engine,
        [
            ("alice", word("phone", "online")),
            ("alice", word("phone", "online")),
            ("alice", word("laptop", "online")),
        ],
    )
    assert (first.came_online, again.came_online, other.came_online) == (True, False, True)
