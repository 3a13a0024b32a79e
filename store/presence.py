"""Presence: each device's last word, and the user-level state the bridge publishes.

A user is online while any of their devices is. Devices say ``online`` when they
connect and then every few minutes; their last will says ``offline``. A device whose
will was lost (a broker that crashed, say) is taken offline when its announcements
stop for longer than a TTL, by :func:`expire`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, func, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from protocol import UpPresence, errors

from . import devices as devices_cap
from .tables import Device
from .types import utcnow


@dataclass(frozen=True, slots=True)
class UserPresence:
    user: str
    online: bool
    #: since when: for an offline user, when they were last seen.
    at: datetime
    changed: bool
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
            devices[user][item.device] = online
            last_word[(user, item.device)] = online
            after = any(devices[user].values())
            out.append(UserPresence(user, after, now, changed=after != before))
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
