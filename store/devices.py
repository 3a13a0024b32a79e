"""How many devices a user has, for the cap on them.

A device is a name a user's connection announced itself with (``up/presence``, the
``devices`` table) or acknowledged messages from (``up/ack``, the ``cursors`` table).
Each new name costs rows that live as long as the account, and ``GET /v1/messages/{id}``
lists every one of them: a presence flood with 20,000 names left 19,835 rows, an ack
flood with 5,000 names made one delivery trace 870 KB. So a user has at most
``max_devices`` names (``MQCHAT_BRIDGE_MAX_DEVICES``); a new one beyond that is
refused with ``too_many_devices`` and costs nothing more. Names already known keep
working, so an honest client that keeps its device name never meets the cap.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import union
from sqlmodel import Session, col, select

from protocol import errors

from .tables import Cursor, Device

#: Device names one user may have, unless the bridge is configured otherwise.
DEFAULT_MAX_DEVICES = 16


def known(session: Session, users: Iterable[str]) -> dict[str, set[str]]:
    """Every device name of each of ``users`` (one statement)."""
    wanted = sorted(set(users))
    found: dict[str, set[str]] = {user: set() for user in wanted}
    if not wanted:
        return found
    names = union(
        select(col(Device.username), col(Device.device)).where(col(Device.username).in_(wanted)),
        select(col(Cursor.username), col(Cursor.device)).where(col(Cursor.username).in_(wanted)),
    )
    for user, device in session.execute(names):
        found[user].add(device)
    return found


def too_many(user: str, max_devices: int) -> errors.ProtocolError:
    return errors.ProtocolError(
        errors.TOO_MANY_DEVICES,
        f"{user} already has {max_devices} devices; use one of their names again",
    )
