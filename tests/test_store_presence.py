"""``presence.update_batch`` on real SQLite and PostgreSQL: a batch of announcements.

A user is online while any device is; each announcement in a batch is judged after
the ones before it, and the devices' last words are what is stored.
"""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlmodel import Session, col

from protocol import UpPresence
from store import presence
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
