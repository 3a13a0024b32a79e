"""Group changes: each is an event stored in the conversation's timeline.

A change takes the next seq of its conversation like a message, in the same
transaction that changes ``members`` and ``member_periods``, so members see events
and messages in one order, and who sees which seq follows from the events::

    apply_op(sender, op) ─▶ found under (sender, op id)? ─▶ the same event again
                         ─▶ create: conversation + members + periods + event at seq 1
                         ─▶ else: lock the conversation row ─▶ rules (codes below)
                              ─▶ last_seq + 1 = members_seq ─▶ members, periods
                              ─▶ the event, stored like a message

Refusals, each with its code and nothing stored: not a member of a group
(``unknown_conversation``, also for a direct conversation or none), not an admin
(``forbidden``), no such user (``unknown_user``), ``already_member``, ``not_member``,
``already_admin``, ``not_admin``, demoting the last admin (``last_admin``), over the
size cap (``group_full``). When the last admin leaves, the member who has been in the
group longest becomes one (named in the ``left`` event's ``promoted``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlmodel import col

from protocol import UpGroup, errors

from .history import MESSAGE_COLUMNS, to_history_message
from .messages import Outcome, StoredMessage, found_again, new_conversation_id, recipients_at
from .tables import Account, Conversation, Member, MemberPeriod, Message
from .types import utcnow

#: The group size cap when none is given (WhatsApp's).
DEFAULT_MAX_MEMBERS: Final = 1024
#: Names an event's text lists before "and N others".
_NAMES_SHOWN: Final = 10

_EVENT_OF_OP: Final = {
    "create": "created",
    "add": "added",
    "remove": "removed",
    "leave": "left",
    "promote": "promoted",
    "demote": "demoted",
    "rename": "renamed",
}


@dataclass(frozen=True, slots=True)
class _Member:
    role: str
    since_seq: int


def apply_op(
    engine: Engine, sender: str, op: UpGroup, max_members: int = DEFAULT_MAX_MEMBERS
) -> Outcome:
    """Apply one group op of ``sender`` in one transaction; its event, or a refusal.

    A resend (the same ``id`` and the same op) finds the stored event and answers with
    it again, to the users who received it then; the same id with another op is
    ``id_reused``.
    """
    with engine.begin() as conn:
        before = conn.execute(
            select(*MESSAGE_COLUMNS).where(
                col(Message.sender) == sender, col(Message.client_id) == op.id
            )
        ).first()
        if before is not None:
            stored = to_history_message(before)
            if (stored.event, _without_promoted(stored.event_data)) != (
                _EVENT_OF_OP[op.op],
                _details(op, sender),
            ):
                return Outcome(error=_id_reused(op))
            readers = recipients_at(conn, {(stored.conversation, stored.seq)})
            return Outcome(stored=found_again(stored, readers))
        if op.op == "create":
            return _create(conn, sender, op, max_members)
        return _change(conn, sender, op, max_members)


def _create(conn: Connection, sender: str, op: UpGroup, max_members: int) -> Outcome:
    assert op.name is not None  # the model requires it
    others = _others(op, sender)
    if len(others) + 1 > max_members:
        return _refuse(errors.GROUP_FULL, f"a group has at most {max_members} members", op)
    missing = _missing_accounts(conn, others)
    if missing:
        return _refuse(errors.UNKNOWN_USER, f"no user {', '.join(missing)}", op)
    conversation = new_conversation_id()
    now = utcnow()
    conn.execute(
        insert(Conversation).values(
            id=conversation,
            kind="group",
            name=op.name,
            last_seq=1,
            members_seq=1,
            created_at=now,
        )
    )
    roles = {sender: "admin"} | {user: "member" for user in others}
    _join(conn, conversation, roles, 1)
    return _event(conn, sender, op, conversation, 1, tuple(sorted(roles)))


def _change(conn: Connection, sender: str, op: UpGroup, max_members: int) -> Outcome:
    assert op.conversation is not None  # the model requires it
    conversation = op.conversation
    group = conn.execute(
        select(col(Conversation.kind), col(Conversation.last_seq))
        .where(col(Conversation.id) == conversation)
        .with_for_update()
    ).first()
    members = {
        username: _Member(role, since_seq)
        for username, role, since_seq in conn.execute(
            select(col(Member.username), col(Member.role), col(Member.since_seq)).where(
                col(Member.conversation_id) == conversation
            )
        )
    }
    if group is None or group.kind != "group" or sender not in members:
        # Same answer for "does not exist" and "not yours": no probing.
        return _refuse(errors.UNKNOWN_CONVERSATION, f"no group {conversation!r} of yours", op)
    if op.op != "leave" and members[sender].role != "admin":
        return _refuse(errors.FORBIDDEN, f"only an admin may {op.op} in this group", op)
    seq = group.last_seq + 1
    users = _named(op)
    receivers = set(members)
    promoted: list[str] = []
    if op.op == "add":
        refusal = _check_add(conn, op, users, members, max_members)
        if refusal is not None:
            return refusal
        _join(conn, conversation, dict.fromkeys(users, "member"), seq)
        receivers.update(users)
    elif op.op == "remove":
        if sender in users:
            return _refuse(errors.INVALID_PAYLOAD, "to leave a group, use the op 'leave'", op)
        outside = [user for user in users if user not in members]
        if outside:
            return _refuse(errors.NOT_MEMBER, f"not in this group: {', '.join(outside)}", op)
        _part(conn, conversation, users, seq)
    elif op.op == "leave":
        rest = {user: member for user, member in members.items() if user != sender}
        if rest and all(member.role != "admin" for member in rest.values()):
            # The last admin leaves. WhatsApp's rule: the member in the group longest
            # (then by name) becomes admin.
            promoted = [min(rest, key=lambda user: (rest[user].since_seq, user))]
            _set_role(conn, conversation, promoted, "admin")
        _part(conn, conversation, [sender], seq)
    elif op.op in ("promote", "demote"):
        refusal = _check_roles(op, users, members)
        if refusal is not None:
            return refusal
        _set_role(conn, conversation, users, "admin" if op.op == "promote" else "member")
    else:  # rename
        conn.execute(
            update(Conversation).where(col(Conversation.id) == conversation).values(name=op.name)
        )
    conn.execute(
        update(Conversation)
        .where(col(Conversation.id) == conversation)
        .values(last_seq=seq, members_seq=seq)
    )
    return _event(conn, sender, op, conversation, seq, tuple(sorted(receivers)), promoted)


def _check_add(
    conn: Connection,
    op: UpGroup,
    users: Sequence[str],
    members: dict[str, _Member],
    max_members: int,
) -> Outcome | None:
    missing = _missing_accounts(conn, users)
    if missing:
        return _refuse(errors.UNKNOWN_USER, f"no user {', '.join(missing)}", op)
    inside = [user for user in users if user in members]
    if inside:
        return _refuse(errors.ALREADY_MEMBER, f"already in this group: {', '.join(inside)}", op)
    if len(members) + len(users) > max_members:
        return _refuse(
            errors.GROUP_FULL,
            f"a group has at most {max_members} members; it has {len(members)}",
            op,
        )
    return None


def _check_roles(op: UpGroup, users: Sequence[str], members: dict[str, _Member]) -> Outcome | None:
    outside = [user for user in users if user not in members]
    if outside:
        return _refuse(errors.NOT_MEMBER, f"not in this group: {', '.join(outside)}", op)
    if op.op == "promote":
        admins = [user for user in users if members[user].role == "admin"]
        if admins:
            return _refuse(errors.ALREADY_ADMIN, f"already admins: {', '.join(admins)}", op)
        return None
    plain = [user for user in users if members[user].role != "admin"]
    if plain:
        return _refuse(errors.NOT_ADMIN, f"not admins: {', '.join(plain)}", op)
    if all(member.role != "admin" or user in users for user, member in members.items()):
        return _refuse(
            errors.LAST_ADMIN, "a group keeps at least one admin; promote another first", op
        )
    return None


def _join(conn: Connection, conversation: str, roles: dict[str, str], seq: int) -> None:
    now = utcnow()
    conn.execute(
        insert(Member),
        [
            {
                "conversation_id": conversation,
                "username": user,
                "joined_at": now,
                "role": role,
                "since_seq": seq,
            }
            for user, role in sorted(roles.items())
        ],
    )
    conn.execute(
        insert(MemberPeriod),
        [
            {"conversation_id": conversation, "username": user, "first_seq": seq, "last_seq": None}
            for user in sorted(roles)
        ],
    )


def _part(conn: Connection, conversation: str, users: Sequence[str], seq: int) -> None:
    """End the membership of ``users`` at ``seq``: they see the event that ends it."""
    conn.execute(
        delete(Member).where(
            col(Member.conversation_id) == conversation, col(Member.username).in_(users)
        )
    )
    conn.execute(
        update(MemberPeriod)
        .where(
            col(MemberPeriod.conversation_id) == conversation,
            col(MemberPeriod.username).in_(users),
            col(MemberPeriod.last_seq).is_(None),
        )
        .values(last_seq=seq)
    )


def _set_role(conn: Connection, conversation: str, users: Sequence[str], role: str) -> None:
    conn.execute(
        update(Member)
        .where(col(Member.conversation_id) == conversation, col(Member.username).in_(users))
        .values(role=role)
    )


def _event(
    conn: Connection,
    sender: str,
    op: UpGroup,
    conversation: str,
    seq: int,
    receivers: tuple[str, ...],
    promoted: Sequence[str] = (),
) -> Outcome:
    event = _EVENT_OF_OP[op.op]
    details = _details(op, sender)
    now = utcnow()
    body = _text(sender, op, promoted)
    stored_details = details
    if promoted:
        stored_details = json.dumps(
            {**json.loads(details), "promoted": list(promoted)}, sort_keys=True
        )
    conn.execute(
        insert(Message).values(
            conversation_id=conversation,
            seq=seq,
            sender=sender,
            client_id=op.id,
            body=body,
            sent_at=now,
            event=event,
            event_data=stored_details,
        )
    )
    stored = StoredMessage(
        op.id,
        conversation,
        seq,
        sender,
        body,
        now,
        event,
        stored_details,
        members=receivers,
        duplicate=False,
    )
    return Outcome(stored=stored)


def _details(op: UpGroup, sender: str) -> str:
    """The event's details as stored, from the op alone: a resend is recognised by them.

    ``promoted`` (who the last admin's leaving made admin) is added to what is stored,
    and is no part of what a resend is compared on.
    """
    details: dict[str, object] = {}
    if op.op == "create":
        details["users"] = _others(op, sender)
    elif op.op in ("add", "remove", "promote", "demote"):
        details["users"] = _named(op)
    if op.name is not None and op.op in ("create", "rename"):
        details["name"] = op.name
    return json.dumps(details, sort_keys=True)


def _without_promoted(stored: str | None) -> str:
    details = json.loads(stored) if stored else {}
    details.pop("promoted", None)
    return json.dumps(details, sort_keys=True)


def _text(sender: str, op: UpGroup, promoted: Sequence[str]) -> str:
    """What a client that knows no events shows: a line in the conversation."""
    users = _names(_others(op, sender) if op.op == "create" else _named(op))
    text = {
        "create": f'{sender} created the group "{op.name}"',
        "add": f"{sender} added {users}",
        "remove": f"{sender} removed {users}",
        "leave": f"{sender} left",
        "promote": f"{sender} made {users} admin",
        "demote": f"{sender} dismissed {users} as admin",
        "rename": f'{sender} renamed the group to "{op.name}"',
    }[op.op]
    if promoted:
        text += f"; {_names(promoted)} is now admin"
    return text


def _names(users: Sequence[str]) -> str:
    if len(users) <= _NAMES_SHOWN:
        return ", ".join(users)
    return f"{', '.join(users[:_NAMES_SHOWN])} and {len(users) - _NAMES_SHOWN} others"


def _named(op: UpGroup) -> list[str]:
    """The users an op names, once each, in order."""
    return sorted(set(op.members or ()))


def _others(op: UpGroup, sender: str) -> list[str]:
    """The users an op names, once each, without the sender (who is in anyway)."""
    return sorted(set(op.members or ()) - {sender})


def _missing_accounts(conn: Connection, users: Sequence[str]) -> list[str]:
    if not users:
        return []
    found = set(
        conn.execute(
            select(col(Account.username)).where(
                col(Account.username).in_(users), ~col(Account.disabled)
            )
        ).scalars()
    )
    return [user for user in users if user not in found]


def _refuse(code: str, detail: str, op: UpGroup) -> Outcome:
    return Outcome(error=errors.ProtocolError(code, detail, id=op.id))


def _id_reused(op: UpGroup) -> errors.ProtocolError:
    return errors.ProtocolError(
        errors.ID_REUSED,
        f"id {op.id!r} is already a message or group change of yours; a new change needs a new id",
        id=op.id,
    )
