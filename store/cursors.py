"""Delivered/read cursors per device, and the member-level cursors receipts report.

A device says "I have everything up to seq N" (delivered) or "the user has seen
everything up to seq N" (read). Cursors only move forward; a lower value is ignored,
never an error, so a late or repeated ack cannot lose a higher one. A member's
cursor is the furthest of its devices', and a receipt goes out only when that moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import Engine, func
from sqlmodel import Session, select

from protocol import UpAck, errors

from . import devices as devices_cap
from .tables import Conversation, Cursor, CursorMove, Member
from .types import utcnow

Kind = Literal["delivered", "read"]


@dataclass(frozen=True, slots=True)
class CursorChange:
    """A member's cursor moved: who must be told, and what."""

    conversation: str
    user: str
    kind: Kind
    seq: int
    at: datetime
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AckOutcome:
    changes: tuple[CursorChange, ...] = ()
    error: errors.ProtocolError | None = None


def advance_batch(
    engine: Engine,
    acks: Sequence[tuple[str, UpAck]],
    max_devices: int = devices_cap.DEFAULT_MAX_DEVICES,
) -> list[AckOutcome]:
    """Apply a batch of acks in one transaction; one outcome per ack, in order.

    An ack from a new device name beyond ``max_devices`` is refused with
    ``too_many_devices`` before anything else is looked at (``store.devices``).
    """
    with Session(engine) as session:
        names = devices_cap.known(session, (user for user, _ in acks))
        outcomes = []
        for user, ack in acks:
            if ack.device not in names[user] and len(names[user]) >= max_devices:
                outcomes.append(AckOutcome(error=devices_cap.too_many(user, max_devices)))
                continue
            outcome = _advance(session, user, ack)
            if outcome.error is None:
                names[user].add(ack.device)
            outcomes.append(outcome)
        session.commit()
        return outcomes


def _advance(session: Session, user: str, ack: UpAck) -> AckOutcome:
    row = session.exec(
        select(Conversation.last_seq)
        .join(Member, Member.conversation_id == Conversation.id)  # type: ignore[arg-type]
        .where(Conversation.id == ack.conversation, Member.username == user)
    ).first()
    if row is None:
        return AckOutcome(
            error=errors.ProtocolError(
                errors.UNKNOWN_CONVERSATION, f"no conversation {ack.conversation!r} of yours"
            )
        )
    last_seq = row
    wanted: dict[Kind, int] = {}
    if ack.read is not None:
        wanted["read"] = ack.read
        wanted["delivered"] = ack.read  # what was read was delivered
    if ack.delivered is not None:
        wanted["delivered"] = max(ack.delivered, wanted.get("delivered", 0))
    beyond = max(wanted.values())
    if beyond > last_seq:
        return AckOutcome(
            error=errors.ProtocolError(
                errors.INVALID_PAYLOAD,
                f"seq {beyond} is beyond the conversation's last message ({last_seq})",
            )
        )

    before = _member_cursors(session, ack.conversation, user)
    cursor = session.get(Cursor, (ack.conversation, user, ack.device))
    if cursor is None:
        cursor = Cursor(conversation_id=ack.conversation, username=user, device=ack.device)
        session.add(cursor)
    now = utcnow()
    moved = False
    for kind, seq in wanted.items():
        current = cursor.read_seq if kind == "read" else cursor.delivered_seq
        if seq <= current:
            continue
        moved = True
        if kind == "read":
            cursor.read_seq, cursor.read_at = seq, now
        else:
            cursor.delivered_seq, cursor.delivered_at = seq, now
        session.add(
            CursorMove(
                conversation_id=ack.conversation,
                username=user,
                device=ack.device,
                kind=kind,
                up_to=seq,
                at=now,
            )
        )
    if not moved:
        return AckOutcome()
    session.flush()
    after = _member_cursors(session, ack.conversation, user)
    members = tuple(
        session.exec(
            select(Member.username)
            .where(Member.conversation_id == ack.conversation)
            .order_by(Member.username)
        ).all()
    )
    changes = tuple(
        CursorChange(ack.conversation, user, kind, after[kind], now, members)
        for kind in ("delivered", "read")
        if after[kind] > before[kind]
    )
    return AckOutcome(changes=changes)


def _member_cursors(session: Session, conversation: str, user: str) -> dict[Kind, int]:
    delivered, read = session.exec(
        select(func.max(Cursor.delivered_seq), func.max(Cursor.read_seq)).where(
            Cursor.conversation_id == conversation, Cursor.username == user
        )
    ).one()
    return {"delivered": delivered or 0, "read": read or 0}


@dataclass(frozen=True, slots=True)
class DeviceCursor:
    conversation: str
    delivered: int
    read: int


def of_device(session: Session, user: str, device: str) -> list[DeviceCursor]:
    """One device's cursors in every conversation it has acked (for resuming)."""
    rows = session.exec(
        select(Cursor)
        .where(Cursor.username == user, Cursor.device == device)
        .order_by(Cursor.conversation_id)
    ).all()
    return [DeviceCursor(r.conversation_id, r.delivered_seq, r.read_seq) for r in rows]
