"""Push when away: who gets woken up for what, decided once, in the database.

::

    bridge ── COMMIT messages ─────────────────────────────── (nothing push-specific)
    push daemon(s):
      scan    messages after push_scan.message_pk ──▶ push_state (user, conversation):
              pending_seq, due_at = now (no device online) or sent_at + grace
      decide  push_state due ──▶ delivered by a device? nothing : push_outbox row per
              subscribed device (count, sender), decided_seq = pending_seq
      claim   push_outbox due ──▶ leased to this daemon ──▶ sent / gone / failed

The bridge writes nothing for pushes: the scan reads what it committed, so its hot
path (benchmarked) pays nothing. Each step is one short transaction whose rows are
taken with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (several push daemons take
different rows, none waits) and under SQLite's one writer (``BEGIN IMMEDIATE``)
otherwise: every message is scanned once, every burst decided once, every outbox row
claimed by one daemon at a time. Nothing is held open across an HTTP request, and
a step takes its write transaction only when a lock-free read (:func:`work`) saw
something for it to do: on SQLite the write lock is the bridge's too.

A push carries no message text unless its user opted into previews. Group events
wake only the users an event made members (``created``, ``added``): being added to a
group is news, the rest (renames, others joining or leaving) can wait for the app.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from sqlalchemy import Engine, and_, func, or_, tuple_
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from .tables import (
    Cursor,
    Device,
    Member,
    Message,
    PushMute,
    PushOutbox,
    PushPrefs,
    PushScan,
    PushState,
    PushSubscription,
)
from .types import utcnow

Channel = Literal["webpush", "unifiedpush"]
CHANNELS: Final = ("webpush", "unifiedpush")
Outcome = Literal["sent", "gone", "failed"]
_SCAN_ROW: Final = 1
#: Most gaps remembered: a storm of rolled-back transactions cannot grow the row.
_MAX_GAPS: Final = 10_000
#: Conversations whose messages one query reads (SQLite's expression depth bounds it).
_RANGES: Final = 200
#: The group events that push, to the users they name: those made members.
PUSHED_EVENTS: Final = ("created", "added")


def _woken(event: str | None, event_data: str | None) -> frozenset[str] | None:
    """Who a group event pushes to (the users it made members, none for the other
    events); None for a message, which pushes to every member but its sender."""
    if event is None:
        return None
    if event not in PUSHED_EVENTS:
        return frozenset()
    users = json.loads(event_data or "{}").get("users", [])
    return frozenset(str(user) for user in users)


# -- subscriptions and settings (history API) ----------------------------------------


def subscribe(
    session: Session,
    user: str,
    device: str,
    channel: Channel,
    endpoint: str,
    p256dh: str,
    auth: str,
) -> bool:
    """Store ``device``'s subscription, replacing any it had; True if it is new."""
    row = session.get(PushSubscription, (user, device))
    fresh = row is None
    if row is None:
        row = PushSubscription(
            username=user,
            device=device,
            channel=channel,
            endpoint=endpoint,
            p256dh=p256dh,
            auth=auth,
        )
    else:
        row.channel, row.endpoint, row.p256dh, row.auth = channel, endpoint, p256dh, auth
        row.created_at = utcnow()
    session.add(row)
    return fresh


def subscription(session: Session, user: str, device: str) -> PushSubscription | None:
    return session.get(PushSubscription, (user, device))


def unsubscribe(session: Session, user: str, device: str) -> bool:
    row = session.get(PushSubscription, (user, device))
    if row is None:
        return False
    session.delete(row)
    return True


def subscriptions(session: Session, user: str) -> list[PushSubscription]:
    """``user``'s push subscriptions, by device name (for the admin routes)."""
    query = select(PushSubscription).where(PushSubscription.username == user)
    return list(session.exec(query.order_by(col(PushSubscription.device))))


def subscribed_devices(session: Session, users: Iterable[str]) -> dict[str, set[str]]:
    """Which of ``users``' devices have a subscription (for the delivery trace)."""
    wanted = sorted(set(users))
    found: dict[str, set[str]] = {user: set() for user in wanted}
    if wanted:
        rows = session.exec(
            select(PushSubscription.username, PushSubscription.device).where(
                col(PushSubscription.username).in_(wanted)
            )
        )
        for user, device in rows:
            found[user].add(device)
    return found


@dataclass(frozen=True, slots=True)
class Prefs:
    muted: bool
    preview: bool
    muted_conversations: tuple[str, ...]


def prefs(session: Session, user: str) -> Prefs:
    row = session.get(PushPrefs, user)
    mutes = session.exec(
        select(PushMute.conversation_id)
        .where(PushMute.username == user)
        .order_by(col(PushMute.conversation_id))
    ).all()
    return Prefs(
        muted=row.muted if row else False,
        preview=row.preview if row else False,
        muted_conversations=tuple(mutes),
    )


def set_prefs(session: Session, user: str, *, muted: bool, preview: bool) -> None:
    row = session.get(PushPrefs, user) or PushPrefs(username=user)
    row.muted, row.preview = muted, preview
    session.add(row)


def mute(session: Session, user: str, conversation: str, muted: bool) -> None:
    row = session.get(PushMute, (user, conversation))
    if muted and row is None:
        session.add(PushMute(username=user, conversation_id=conversation))
    elif not muted and row is not None:
        session.delete(row)


# -- the push daemons ----------------------------------------------------------------


def publish_key(engine: Engine, public_key: str) -> None:
    """Record the VAPID public key the daemons sign with, for the API to serve."""
    with Session(engine) as session:
        row = session.get(PushScan, _SCAN_ROW)
        if row is not None and row.vapid_public_key != public_key:
            row.vapid_public_key = public_key
            session.add(row)
            session.commit()


def vapid_key(session: Session) -> str | None:
    row = session.get(PushScan, _SCAN_ROW)
    return row.vapid_public_key if row else None


@dataclass(frozen=True, slots=True)
class Work:
    """Which steps have something to do, as a read without locks saw it."""

    scan: bool
    decide: bool
    claim: bool

    def __bool__(self) -> bool:
        return self.scan or self.decide or self.claim


def work(engine: Engine) -> Work:
    """Look before writing: on SQLite each step's transaction takes the database's one
    write lock, which the bridge needs for every batch; an idle push daemon polling
    with writes would take it several times a second for nothing. Pass a
    :func:`store.db.reading` engine."""
    now = utcnow()
    with Session(engine) as session:
        state = session.get(PushScan, _SCAN_ROW)
        if state is None:
            return Work(False, False, False)
        newer = session.exec(
            select(Message.pk).where(col(Message.pk) > state.message_pk).limit(1)
        ).first()
        due = session.exec(
            select(PushState.username).where(col(PushState.due_at) <= now).limit(1)
        ).first()
        claimable = session.exec(
            select(PushOutbox.pk)
            .where(PushOutbox.state == "due", col(PushOutbox.due_at) <= now)
            .limit(1)
        ).first()
        return Work(
            scan=newer is not None or state.gaps != "[]",
            decide=due is not None,
            claim=claimable is not None,
        )


def scan(
    engine: Engine,
    *,
    grace: timedelta,
    collapse: timedelta,
    limit: int,
    gap_timeout: timedelta,
) -> int:
    """Read the messages committed since the last scan into ``push_state``.

    Returns how many messages it read (0: nothing new, or another daemon is
    scanning). A message key below the newest seen but not seen itself is a gap: a
    transaction (another bridge's) that took its key and had not committed when the
    scan passed. Gaps are looked for again on each scan until ``gap_timeout`` (a
    rolled-back transaction leaves one forever).
    """
    now = utcnow()
    with Session(engine) as session:
        state = session.exec(
            select(PushScan).where(PushScan.id == _SCAN_ROW).with_for_update(skip_locked=True)
        ).first()
        if state is None:
            return 0
        gaps: dict[int, float] = {int(pk): float(at) for pk, at in json.loads(state.gaps)}
        after = state.message_pk
        query = select(Message).where(col(Message.pk) > after)
        newer = list(session.exec(query.order_by(col(Message.pk)).limit(limit)).all())
        found = (
            list(session.exec(select(Message).where(col(Message.pk).in_(sorted(gaps)))).all())
            if gaps
            else []
        )
        for message in found:
            gaps.pop(message.pk or 0, None)
        if newer:
            top = newer[-1].pk or after
            seen = {m.pk for m in newer}
            epoch = now.timestamp()
            gaps.update({pk: epoch for pk in range(after + 1, top) if pk not in seen})
            state.message_pk = top
        cutoff = (now - gap_timeout).timestamp()
        kept = sorted((pk, at) for pk, at in gaps.items() if at > cutoff)[-_MAX_GAPS:]
        state.gaps = json.dumps(kept)
        session.add(state)
        _note_pending(session, found + newer, now, grace, collapse)
        session.commit()
        return len(newer) + len(found)


def _note_pending(
    session: Session,
    messages: Sequence[Message],
    now: datetime,
    grace: timedelta,
    collapse: timedelta,
) -> None:
    woken = {id(m): _woken(m.event, m.event_data) for m in messages}
    chat = [m for m in messages if woken[id(m)] is None or woken[id(m)]]
    if not chat:
        return
    conversations = sorted({m.conversation_id for m in chat})
    members: dict[str, list[str]] = {}
    for conversation, user in session.exec(
        select(Member.conversation_id, Member.username)
        .join(PushSubscription, col(PushSubscription.username) == col(Member.username))
        .where(col(Member.conversation_id).in_(conversations))
        .distinct()
    ):
        members.setdefault(conversation, []).append(user)
    users = sorted({u for us in members.values() for u in us})
    if not users:
        return
    online = set(
        session.exec(
            select(Device.username).where(col(Device.username).in_(users), col(Device.online))
        ).all()
    )
    # (user, conversation) -> (newest seq, when its grace ends)
    due: dict[tuple[str, str], tuple[int, datetime]] = {}
    for message in chat:
        named = woken[id(message)]
        for user in members.get(message.conversation_id, ()):
            key = (user, message.conversation_id)
            if user == message.sender or (named is not None and user not in named):
                continue
            at = now if user not in online else message.sent_at + grace
            seq, first = due.get(key, (0, at))
            due[key] = (max(seq, message.seq), min(first, at))
    states = {
        (row.username, row.conversation_id): row
        for row in session.exec(
            select(PushState)
            .where(
                col(PushState.username).in_(sorted({u for u, _ in due})),
                col(PushState.conversation_id).in_(conversations),
            )
            .with_for_update()
        )
    }
    for (user, conversation), (seq, at) in sorted(due.items()):
        row = states.get((user, conversation)) or PushState(
            username=user, conversation_id=conversation
        )
        if seq <= max(row.decided_seq, row.pending_seq):
            continue  # scanned before (a gap found late, a second scan)
        row.pending_seq = seq
        if row.due_at is None:
            # One push per burst: the next one waits for the last one's window.
            if row.pushed_at is not None:
                at = max(at, row.pushed_at + collapse)
            row.due_at = at
        session.add(row)


def decide(engine: Engine, *, limit: int) -> tuple[int, int]:
    """Decide the bursts whose grace has ended: (pushes decided, skipped as delivered).

    A burst is pushed to every subscribed device of its user when no device of theirs
    has acknowledged its newest message as delivered (a ``read`` counts: it implies
    delivered). The count is what no device has acknowledged yet.

    The bursts of one call are decided together, a handful of queries for all of
    them rather than several per burst: a round trip per row per burst made deciding,
    not sending, what bounded a push daemon's throughput.
    """
    now = utcnow()
    pushed = skipped = 0
    with Session(engine) as session:
        due = session.exec(
            select(PushState)
            .where(col(PushState.due_at) <= now)
            .order_by(col(PushState.due_at))
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if not due:
            return 0, 0
        facts = _Facts.load(session, [(s.username, s.conversation_id, s.pending_seq) for s in due])
        for state in due:
            user, conversation, seq = state.username, state.conversation_id, state.pending_seq
            delivered = facts.delivered.get((user, conversation), 0)
            state.decided_seq, state.pending_seq, state.due_at = seq, 0, None
            session.add(state)
            if delivered >= seq or facts.muted(user, conversation):
                skipped += 1
                continue
            waiting = facts.waiting(user, conversation, delivered, seq)
            devices = facts.devices.get(user, [])
            if not waiting or not devices:
                skipped += 1
                continue
            state.pushed_at = now
            preview = facts.preview_of(session, user, conversation, waiting[-1].seq)
            for device in devices:
                session.add(
                    PushOutbox(
                        username=user,
                        device=device,
                        conversation_id=conversation,
                        from_seq=waiting[0].seq,
                        seq=seq,
                        count=len(waiting),
                        sender=waiting[-1].sender,
                        preview=preview,
                        event=waiting[-1].event,
                        decided_at=now,
                        due_at=now,
                    )
                )
                pushed += 1
        session.commit()
    return pushed, skipped


@dataclass(frozen=True, slots=True)
class _Waiting:
    seq: int
    sender: str
    #: For a group event that pushes: its kind, and the users it made members.
    event: str | None = None
    named: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Facts:
    """What deciding a set of bursts needs to know, read in one query per kind."""

    #: (user, conversation) -> the furthest any of the user's devices acknowledged,
    #: or the seq before the user became a member if that is further: what came
    #: before they joined is not theirs to be told about.
    delivered: dict[tuple[str, str], int]
    muted_users: set[str]
    preview_users: set[str]
    muted_pairs: set[tuple[str, str]]
    #: user -> subscribed devices, in key order.
    devices: dict[str, list[str]]
    #: conversation -> messages and pushing group events that may wait, in seq order.
    messages: dict[str, list[_Waiting]]

    @classmethod
    def load(cls, session: Session, bursts: Sequence[tuple[str, str, int]]) -> _Facts:
        """For ``bursts``: (user, conversation, newest seq), each pair once."""
        pairs = [(user, conversation) for user, conversation, _ in bursts]
        users = sorted({user for user, _ in pairs})
        # In the key's order (conversation, user, device): one index range per pair.
        delivered: dict[tuple[str, str], int] = {
            (user, conversation): seq or 0
            for conversation, user, seq in session.exec(
                select(Cursor.conversation_id, Cursor.username, func.max(Cursor.delivered_seq))
                .where(
                    tuple_(col(Cursor.conversation_id), col(Cursor.username)).in_(
                        [(conversation, user) for user, conversation in pairs]
                    )
                )
                .group_by(col(Cursor.conversation_id), col(Cursor.username))
            )
        }
        for conversation, user, since in session.exec(
            select(Member.conversation_id, Member.username, Member.since_seq).where(
                tuple_(col(Member.conversation_id), col(Member.username)).in_(
                    [(conversation, user) for user, conversation in pairs]
                )
            )
        ):
            key = (user, conversation)
            delivered[key] = max(delivered.get(key, 0), since - 1)
        prefs = session.exec(select(PushPrefs).where(col(PushPrefs.username).in_(users))).all()
        muted_pairs = set(
            session.exec(
                select(PushMute.username, PushMute.conversation_id).where(
                    tuple_(col(PushMute.username), col(PushMute.conversation_id)).in_(pairs)
                )
            ).all()
        )
        devices: dict[str, list[str]] = {}
        for user, device in session.exec(
            select(PushSubscription.username, PushSubscription.device)
            .where(col(PushSubscription.username).in_(users))
            .order_by(col(PushSubscription.username), col(PushSubscription.device))
        ):
            devices.setdefault(user, []).append(device)
        # Each conversation's messages from the least any of its due users has
        # acknowledged to the newest due: one range per conversation, cut per user below.
        spans: dict[str, tuple[int, int]] = {}
        for user, conversation, seq in bursts:
            seen = delivered.get((user, conversation), 0)
            low, high = spans.get(conversation, (seen, seq))
            spans[conversation] = (min(low, seen), max(high, seq))
        messages: dict[str, list[_Waiting]] = {}
        ranges = [
            and_(
                col(Message.conversation_id) == conversation,
                col(Message.seq) > low,
                col(Message.seq) <= high,
            )
            for conversation, (low, high) in sorted(spans.items())
        ]
        for chunk in (ranges[i : i + _RANGES] for i in range(0, len(ranges), _RANGES)):
            # Five columns: more than sqlmodel's select() is typed for.
            for conversation, seq, sender, event, data in session.execute(
                sa_select(
                    col(Message.conversation_id),
                    col(Message.seq),
                    col(Message.sender),
                    col(Message.event),
                    col(Message.event_data),
                )
                .where(
                    or_(*chunk),
                    or_(col(Message.event).is_(None), col(Message.event).in_(PUSHED_EVENTS)),
                )
                .order_by(col(Message.conversation_id), col(Message.seq))
            ):
                messages.setdefault(conversation, []).append(
                    _Waiting(seq, sender, event, _woken(event, data) or frozenset())
                )
        return cls(
            delivered=delivered,
            muted_users={row.username for row in prefs if row.muted},
            preview_users={row.username for row in prefs if row.preview},
            muted_pairs=muted_pairs,
            devices=devices,
            messages=messages,
        )

    def muted(self, user: str, conversation: str) -> bool:
        return user in self.muted_users or (user, conversation) in self.muted_pairs

    def waiting(self, user: str, conversation: str, delivered: int, seq: int) -> list[_Waiting]:
        """The user's unacknowledged messages up to ``seq``, not their own, and the
        events that made them a member."""
        return [
            m
            for m in self.messages.get(conversation, ())
            if delivered < m.seq <= seq
            and m.sender != user
            and (m.event is None or user in m.named)
        ]

    def preview_of(self, session: Session, user: str, conversation: str, seq: int) -> str | None:
        """The newest message's text, read only for a user who opted into previews."""
        if user not in self.preview_users:
            return None
        return session.exec(
            select(Message.body).where(Message.conversation_id == conversation, Message.seq == seq)
        ).first()


@dataclass(frozen=True, slots=True)
class Claimed:
    """An outbox row leased to one daemon, with where to send it."""

    pk: int
    user: str
    device: str
    conversation: str
    seq: int
    count: int
    sender: str
    preview: str | None
    event: str | None
    attempts: int
    channel: str
    endpoint: str
    p256dh: str
    auth: str


def claim(engine: Engine, *, lease: timedelta, limit: int) -> list[Claimed]:
    """Lease up to ``limit`` due pushes to the caller until ``lease`` from now.

    A row whose device has no subscription any more is closed as ``gone`` here.
    """
    now = utcnow()
    out = []
    with Session(engine) as session:
        rows = session.exec(
            select(PushOutbox)
            .where(PushOutbox.state == "due", col(PushOutbox.due_at) <= now)
            .order_by(col(PushOutbox.due_at))
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        subs = _subscriptions(session, {(row.username, row.device) for row in rows})
        for row in rows:
            sub = subs.get((row.username, row.device))
            if sub is None:
                row.state, row.outcome, row.done_at = "gone", "unsubscribed", now
            else:
                row.due_at, row.attempts = now + lease, row.attempts + 1
                out.append(
                    Claimed(
                        pk=row.pk or 0,
                        user=row.username,
                        device=row.device,
                        conversation=row.conversation_id,
                        seq=row.seq,
                        count=row.count,
                        sender=row.sender,
                        preview=row.preview,
                        event=row.event,
                        attempts=row.attempts,
                        channel=sub.channel,
                        endpoint=sub.endpoint,
                        p256dh=sub.p256dh,
                        auth=sub.auth,
                    )
                )
            session.add(row)
        session.commit()
    return out


def finish(engine: Engine, outcomes: Sequence[tuple[Claimed, Outcome, str]]) -> None:
    """Close claimed pushes, in one transaction; ``gone`` also removes the
    subscription it was sent to (unless the device has registered another endpoint
    since)."""
    if not outcomes:
        return
    now = utcnow()
    with Session(engine) as session:
        rows = {
            row.pk: row
            for row in session.exec(
                select(PushOutbox).where(col(PushOutbox.pk).in_([p.pk for p, _, _ in outcomes]))
            )
        }
        gone = [(p.user, p.device) for p, outcome, _ in outcomes if outcome == "gone"]
        subs = _subscriptions(session, set(gone))
        for push, outcome, detail in outcomes:
            row = rows.get(push.pk)
            if row is None or row.state != "due":
                continue
            row.state, row.outcome, row.done_at = outcome, detail[:200], now
            session.add(row)
            if outcome == "gone":
                sub = subs.pop((push.user, push.device), None)
                if sub is not None and sub.endpoint == push.endpoint:
                    session.delete(sub)
        session.commit()


def _subscriptions(
    session: Session, keys: set[tuple[str, str]]
) -> dict[tuple[str, str], PushSubscription]:
    """The subscriptions of these (user, device) keys, in one query."""
    if not keys:
        return {}
    return {
        (sub.username, sub.device): sub
        for sub in session.exec(
            select(PushSubscription).where(
                tuple_(col(PushSubscription.username), col(PushSubscription.device)).in_(
                    sorted(keys)
                )
            )
        )
    }


@dataclass(frozen=True, slots=True)
class PushTrace:
    """A recipient device's push subscription, and the push that covered a message."""

    user: str
    device: str
    channel: str | None
    #: ``due``, ``sent``, ``gone``, ``failed``; None: no push covered the message.
    state: str | None = None
    decided_at: datetime | None = None
    done_at: datetime | None = None


def trace(
    session: Session, conversation: str, seq: int, users: Iterable[str], limit: int
) -> list[PushTrace]:
    """For the delivery trace of message ``seq``: every subscribed device of ``users``
    and the push that covered the message, if one did (also for a device that has
    unsubscribed since)."""
    wanted = sorted(set(users))
    if not wanted:
        return []
    found: dict[tuple[str, str], PushTrace] = {}
    for sub in session.exec(
        select(PushSubscription)
        .where(col(PushSubscription.username).in_(wanted))
        .order_by(col(PushSubscription.username), col(PushSubscription.device))
        .limit(limit)
    ):
        found[(sub.username, sub.device)] = PushTrace(sub.username, sub.device, sub.channel)
    for row in session.exec(
        select(PushOutbox)
        .where(
            PushOutbox.conversation_id == conversation,
            col(PushOutbox.username).in_(wanted),
            col(PushOutbox.from_seq) <= seq,
            col(PushOutbox.seq) >= seq,
        )
        .order_by(col(PushOutbox.pk).desc())
        .limit(limit)
    ):
        before = found.get((row.username, row.device))
        found[(row.username, row.device)] = PushTrace(
            row.username,
            row.device,
            before.channel if before else None,
            row.state,
            row.decided_at,
            row.done_at,
        )
    return [found[key] for key in sorted(found)][:limit]
