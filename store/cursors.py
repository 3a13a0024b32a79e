"""Delivered/read cursors per device, and the member-level cursors receipts report.

A device says "I have everything up to seq N" (delivered) or "the user has seen
everything up to seq N" (read). Cursors only move forward; a lower value is ignored,
never an error, so a late or repeated ack cannot lose a higher one. A member's
cursor is the furthest of its devices', and a receipt goes out only when that moves.

In a group, who moved is not told to everyone: the moves of one batch are summed up
per message sender instead (:class:`GroupTally`), so 1,023 members reading one
message cost its sender one receipt per batch, not 1,023. A former member's devices
may still ack what they had: the ack is clipped to the end of their periods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import Engine, and_, func, or_
from sqlmodel import Session, col, select

from protocol import UpAck, errors

from . import devices as devices_cap
from .history import tally
from .tables import Conversation, Cursor, CursorMove, Member, MemberPeriod, Message
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
    #: Who learns of it: in a direct conversation its members; in a group nobody but
    #: the member's own devices (its senders learn from a :class:`GroupTally`).
    members: tuple[str, ...]
    #: Where the member's cursor was before: the move covers ``before + 1 .. seq``.
    before: int = 0
    group: bool = False


@dataclass(frozen=True, slots=True)
class GroupTally:
    """The newest message of ``sender``'s that one batch's moves reached in a group,
    and how far it has got now: the aggregate receipt its sender is sent."""

    conversation: str
    sender: str
    seq: int
    #: ``read`` if a read cursor reached the message in the batch, else ``delivered``.
    kind: Kind
    #: The member whose move was the batch's last to reach it, and when.
    by: str
    at: datetime
    members: int
    delivered: int
    read: int


@dataclass(frozen=True, slots=True)
class AckOutcome:
    changes: tuple[CursorChange, ...] = ()
    error: errors.ProtocolError | None = None
    #: A batch's tallies of a group ride on the outcome of its last ack that moved a
    #: cursor in that group (so the caller's one-outcome-per-ack shape holds).
    tallies: tuple[GroupTally, ...] = ()


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
        _attach_tallies(session, outcomes)
        session.commit()
        return outcomes


def _attach_tallies(session: Session, outcomes: list[AckOutcome]) -> None:
    """Sum up each group's moves of the batch on the outcome of its last mover."""
    moves: dict[str, list[CursorChange]] = {}
    last: dict[str, int] = {}
    for index, outcome in enumerate(outcomes):
        for change in outcome.changes:
            if change.group:
                moves.setdefault(change.conversation, []).append(change)
                last[change.conversation] = index
    for conversation, changes in moves.items():
        index = last[conversation]
        outcome = outcomes[index]
        outcomes[index] = AckOutcome(
            changes=outcome.changes,
            tallies=outcome.tallies + _tallies(session, conversation, changes),
        )


def _tallies(
    session: Session, conversation: str, changes: Sequence[CursorChange]
) -> tuple[GroupTally, ...]:
    """Per sender, the newest of their messages the moves cover, with its counts.

    Events are not tallied (nobody waits for a tick on "alice added dave"). Only the
    newest message of each sender is: the sender's client holds the count for it,
    and the delivery trace gives any message's exact counts.
    """
    covered = or_(
        *(
            and_(col(Message.seq) > change.before, col(Message.seq) <= change.seq)
            for change in _merged(changes)
        )
    )
    newest = session.exec(
        select(Message.sender, func.max(Message.seq))
        .where(
            col(Message.conversation_id) == conversation,
            col(Message.event).is_(None),
            covered,
        )
        .group_by(col(Message.sender))
        .order_by(col(Message.sender))
    ).all()
    out = []
    for sender, seq in newest:
        reaching = [c for c in changes if c.before < seq <= c.seq and c.user != sender]
        if not reaching:
            continue  # only the sender's own devices moved past it
        counts = tally(session, conversation, seq, sender)
        out.append(
            GroupTally(
                conversation=conversation,
                sender=sender,
                seq=seq,
                kind="read" if any(c.kind == "read" for c in reaching) else "delivered",
                by=reaching[-1].user,
                at=reaching[-1].at,
                members=counts.members,
                delivered=counts.delivered,
                read=counts.read,
            )
        )
    return tuple(out)


def _merged(changes: Sequence[CursorChange]) -> list[CursorChange]:
    """The moves' ranges merged where they overlap: a storm of 1,023 members reading up
    to one seq asks the database about one range, not 1,023."""
    merged: list[CursorChange] = []
    for change in sorted(changes, key=lambda c: c.before):
        if merged and change.before <= merged[-1].seq:
            if change.seq > merged[-1].seq:
                top = merged[-1]
                merged[-1] = CursorChange(
                    top.conversation, top.user, top.kind, change.seq, top.at, (), top.before
                )
            continue
        merged.append(change)
    return merged


def _advance(session: Session, user: str, ack: UpAck) -> AckOutcome:
    # Four statements an ack that moves a cursor (five in a 1:1 conversation), where it
    # took eight: every SDK device acks each message it shows, so on a busy bridge
    # these are most of the database's turns (docs/benchmarks.md, RabbitMQ).
    found = session.exec(
        select(Conversation.last_seq, Conversation.kind, MemberPeriod.last_seq)
        .join(MemberPeriod, col(MemberPeriod.conversation_id) == col(Conversation.id))
        .where(Conversation.id == ack.conversation, MemberPeriod.username == user)
    ).all()
    if not found:
        return AckOutcome(
            error=errors.ProtocolError(
                errors.UNKNOWN_CONVERSATION, f"no conversation {ack.conversation!r} of yours"
            )
        )
    last_seq, conversation_kind, _ = found[0]
    ends = [end for _, _, end in found]
    wanted: dict[Kind, int] = {}
    if ack.read is not None:
        wanted["read"] = ack.read
        wanted["delivered"] = ack.read  # what was read was delivered
    if ack.delivered is not None:
        wanted["delivered"] = max(ack.delivered, wanted.get("delivered", 0))
    if None not in ends:
        # A former member's devices catching up: what they had, and nothing beyond.
        end = max(e for e in ends if e is not None)
        wanted = {k: min(seq, end) for k, seq in wanted.items()}
    beyond = max(wanted.values())
    if beyond > last_seq:
        return AckOutcome(
            error=errors.ProtocolError(
                errors.INVALID_PAYLOAD,
                f"seq {beyond} is beyond the conversation's last message ({last_seq})",
            )
        )
    group = conversation_kind == "group"

    # The user's cursors in this conversation, one per device: the member's cursor is
    # their maximum, before and after this device's moves.
    mine = session.exec(
        select(Cursor).where(Cursor.conversation_id == ack.conversation, Cursor.username == user)
    ).all()
    before: dict[Kind, int] = {
        "delivered": max((c.delivered_seq for c in mine), default=0),
        "read": max((c.read_seq for c in mine), default=0),
    }
    cursor = next((c for c in mine if c.device == ack.device), None)
    if cursor is None:
        cursor = Cursor(conversation_id=ack.conversation, username=user, device=ack.device)
        session.add(cursor)
    now = utcnow()
    moved = False
    for kind, seq in wanted.items():
        current = (cursor.read_seq if kind == "read" else cursor.delivered_seq) or 0
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
    after: dict[Kind, int] = {
        "delivered": max(before["delivered"], cursor.delivered_seq or 0),
        "read": max(before["read"], cursor.read_seq or 0),
    }
    members = (
        (user,)
        if group
        else tuple(
            session.exec(
                select(Member.username)
                .where(Member.conversation_id == ack.conversation)
                .order_by(Member.username)
            ).all()
        )
    )
    changes = tuple(
        CursorChange(ack.conversation, user, k, after[k], now, members, before[k], group)
        for k in ("delivered", "read")
        if after[k] > before[k]
    )
    return AckOutcome(changes=changes)


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
