"""Presence: each device's last word, and the user-level state the bridge publishes.

A user is online while any of their devices is. Devices say ``online`` when they
connect and then every few minutes; their last will says ``offline``. A device whose
will was lost (a broker that crashed, say) is taken offline when its announcements
stop for longer than a TTL, by :func:`expire`.

Who hears of it: a user's **contacts**, the users they share a conversation with (a
1:1, or a group of at most ``group_limit`` members: a large group's members are not
told each other's presence, as WhatsApp shows none in groups). At most
``max_contacts`` of them, 1:1 partners first, so one change costs a bounded fan-out
however many conversations a user has.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, case, func, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from protocol import UpPresence, errors

from . import devices as devices_cap
from .tables import Conversation, Device, Member
from .types import utcnow

#: Groups up to this size make their members each other's contacts (0: groups never do).
DEFAULT_GROUP_LIMIT = 32
#: The one variable that sets it, for the bridge (who is told whose presence) and the
#: history API (whose presence a user may ask for) alike: they must agree.
GROUP_LIMIT_VARIABLE = "MQCHAT_PRESENCE_GROUP_LIMIT"
#: Most contacts one user's presence goes to, and most states in their snapshot.
DEFAULT_MAX_CONTACTS = 500


@dataclass(frozen=True, slots=True)
class UserPresence:
    """A user's presence after an announcement of one of their devices, or as it stands."""

    user: str
    online: bool
    #: since when: for an offline user, when they were last seen.
    at: datetime
    #: The announcement changed the user's state: their contacts are told.
    changed: bool
    #: This announcement brought a device online that was not (its contacts' states
    #: are due to the user: a snapshot).
    came_online: bool = False
    #: Why this announcement was refused (``too_many_devices``); nothing was stored.
    error: errors.ProtocolError | None = None


def update_batch(
    engine: Engine,
    items: Sequence[tuple[str, UpPresence]],
    max_devices: int = devices_cap.DEFAULT_MAX_DEVICES,
) -> list[UserPresence]:
    """Record each device's announcement; one user-level state per item, in order.

    Three statements per batch, whatever its size: read the devices of every user in
    it and the names they used, then one upsert of each announcing device's last word.
    (One query per announcement held a storm of 20,000 reconnecting devices to ~500 a
    second.) A new device name beyond ``max_devices`` is refused (``store.devices``).
    """
    if not items:
        return []
    now = utcnow()
    with Session(engine) as session:
        users = sorted({user for user, _ in items})
        devices: dict[str, dict[str, bool]] = {user: {} for user in users}
        for user, device, online in session.execute(
            select(col(Device.username), col(Device.device), col(Device.online)).where(
                col(Device.username).in_(users)
            )
        ):
            devices[user][device] = online
        names = devices_cap.known(session, users)
        out = []
        last_word: dict[tuple[str, str], bool] = {}
        for user, item in items:
            before = any(devices[user].values())
            if item.device not in names[user] and len(names[user]) >= max_devices:
                error = devices_cap.too_many(user, max_devices)
                out.append(UserPresence(user, before, now, changed=False, error=error))
                continue
            names[user].add(item.device)
            online = item.state == "online"
            came_online = online and not devices[user].get(item.device, False)
            devices[user][item.device] = online
            last_word[(user, item.device)] = online
            after = any(devices[user].values())
            out.append(
                UserPresence(user, after, now, changed=after != before, came_online=came_online)
            )
        if not last_word:
            session.rollback()
            return out
        upsert = (postgresql if engine.dialect.name == "postgresql" else sqlite).insert(Device)
        session.execute(
            upsert.values(
                [
                    {"username": user, "device": device, "online": online, "last_seen": now}
                    for (user, device), online in last_word.items()
                ]
            ).on_conflict_do_update(
                index_elements=["username", "device"],
                set_={"online": upsert.excluded.online, "last_seen": upsert.excluded.last_seen},
            )
        )
        session.commit()
        return out


def expire(engine: Engine, silent_since: datetime) -> list[UserPresence]:
    """Take offline every device not heard from since ``silent_since``.

    Returns the users who went offline because of it.
    """
    with Session(engine) as session:
        users = session.exec(
            select(Device.username)
            .where(col(Device.online), Device.last_seen < silent_since)
            .distinct()
        ).all()
        if not users:
            return []
        session.execute(
            update(Device)
            .where(col(Device.online), col(Device.last_seen) < silent_since)
            .values(online=False)
        )
        session.flush()
        gone = [
            UserPresence(user, False, last_seen(session, user) or utcnow(), changed=True)
            for user in sorted(users)
            if not _online(session, user)
        ]
        session.commit()
        return gone


def last_seen(session: Session, user: str) -> datetime | None:
    return session.exec(select(func.max(Device.last_seen)).where(Device.username == user)).one()


def _online(session: Session, user: str) -> bool:
    return (
        session.exec(
            select(Device.device).where(Device.username == user, col(Device.online)).limit(1)
        ).first()
        is not None
    )


def contacts(
    session: Session,
    users: Collection[str],
    group_limit: int = DEFAULT_GROUP_LIMIT,
    max_contacts: int = DEFAULT_MAX_CONTACTS,
    among: Collection[str] | None = None,
) -> dict[str, list[str]]:
    """Each user's contacts, 1:1 partners first, then by name; at most ``max_contacts``.

    ``among``: only these candidates (the HTTP API's "is this one of mine?").

    One statement for all of ``users``. A group counts while it has at most
    ``group_limit`` members (counted through the members' primary key). Rows read are
    bounded by a user's conversations times ``group_limit``.
    """
    out: dict[str, list[str]] = {user: [] for user in users}
    if not users:
        return out
    me, other, sized = aliased(Member), aliased(Member), aliased(Member)
    size = (
        select(func.count())
        .select_from(sized)
        .where(col(sized.conversation_id) == col(me.conversation_id))
        .scalar_subquery()
    )
    is_group = case((col(Conversation.kind) == "direct", 0), else_=1)
    rows = session.execute(
        select(col(me.username), col(other.username), func.min(is_group).label("g"))
        .join(other, col(other.conversation_id) == col(me.conversation_id))
        .join(Conversation, col(Conversation.id) == col(me.conversation_id))
        .where(
            col(me.username).in_(sorted(users)),
            col(other.username) != col(me.username),
            (col(Conversation.kind) == "direct") | (size <= group_limit),
            true() if among is None else col(other.username).in_(sorted(among)),
        )
        .group_by(col(me.username), col(other.username))
        .order_by(col(me.username), "g", col(other.username))
    )
    for user, contact, _ in rows:
        if len(out[user]) < max_contacts:
            out[user].append(contact)
    return out


def is_contact(session: Session, user: str, other: str, group_limit: int) -> bool:
    """Whether ``other``'s presence is ``user``'s to see (themself included).

    The cap on contacts bounds fan-out, not this answer: the HTTP API tells a user
    the state of anyone they share a conversation with.
    """
    if user == other:
        return True
    return bool(contacts(session, [user], group_limit, max_contacts=1, among=[other])[user])


def states(session: Session, users: Collection[str]) -> dict[str, tuple[bool, datetime]]:
    """Online and the latest time seen of each of ``users`` ever seen (one statement).

    The same words as ``GET /v1/users/{name}/presence``: ``at`` is the latest time one
    of the user's devices was seen.
    """
    if not users:
        return {}
    rows = session.execute(
        select(
            col(Device.username),
            func.max(case((col(Device.online), 1), else_=0)),
            func.max(Device.last_seen),
        )
        .where(col(Device.username).in_(sorted(users)))
        .group_by(col(Device.username))
    )
    return {user: (bool(online), at) for user, online, at in rows}


@dataclass(frozen=True, slots=True)
class Audience:
    """Who hears of a batch's presence changes, and what a snapshot tells whom."""

    #: Contacts of every user asked about (changed or snapshotted).
    contacts: dict[str, list[str]]
    #: The state of every contact of a snapshotted user who was ever seen.
    states: dict[str, tuple[bool, datetime]]


def audience(
    engine: Engine,
    changed: Collection[str],
    snapshot_for: Collection[str],
    group_limit: int = DEFAULT_GROUP_LIMIT,
    max_contacts: int = DEFAULT_MAX_CONTACTS,
) -> Audience:
    """Two statements per batch, whatever its size: contacts, then their states."""
    with Session(engine) as session:
        found = contacts(session, {*changed, *snapshot_for}, group_limit, max_contacts)
        wanted = {contact for user in snapshot_for for contact in found[user]}
        return Audience(found, states(session, wanted))
