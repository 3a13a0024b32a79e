"""The v1 topic tree: the only place that formats or parses a topic string.

Every user's traffic lives under ``chat/v1/u/{user}/``, so one ACL rule per user
isolates them. Devices publish to ``up/...`` and subscribe to ``down/#``; the bridge
does the opposite for everyone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

PREFIX: Final = "chat/v1"

UpKind = Literal["msg", "ack", "typing", "presence", "group"]
DownKind = Literal["msg", "receipt", "typing", "error", "presence"]
UP_KINDS: Final[tuple[UpKind, ...]] = ("msg", "ack", "typing", "presence", "group")
DOWN_KINDS: Final[tuple[DownKind, ...]] = ("msg", "receipt", "typing", "error", "presence")

#: Usernames are topic levels, so they may not contain ``/``, ``+``, ``#`` or start
#: with ``$``. Lower-case ASCII keeps look-alikes from colliding. ``-`` is kept for
#: service accounts (``mqchat-bridge``), so no user can take a service's name.
USERNAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_.]{1,31}$")

#: What the bridge subscribes to: every user's uplink.
ALL_UPLINKS: Final = f"{PREFIX}/u/+/up/#"
#: What the bridge publishes to: every user's downlink.
ALL_DOWNLINKS: Final = f"{PREFIX}/u/+/down/#"
#: The retired presence topics (retained, one per user, readable by every signed-in
#: user until v1.1): nobody may subscribe or publish here any more. Presence now goes
#: to each contact's ``down/presence``.
ALL_PRESENCE: Final = f"{PREFIX}/presence/+"


def is_valid_username(name: str) -> bool:
    return USERNAME_RE.fullmatch(name) is not None


def up(user: str, kind: UpKind) -> str:
    return f"{PREFIX}/u/{user}/up/{kind}"


def down(user: str, kind: DownKind) -> str:
    return f"{PREFIX}/u/{user}/down/{kind}"


def up_msg(user: str) -> str:
    return up(user, "msg")


def down_msg(user: str) -> str:
    return down(user, "msg")


def down_receipt(user: str) -> str:
    return down(user, "receipt")


def down_error(user: str) -> str:
    return down(user, "error")


def down_all(user: str) -> str:
    """The filter a device subscribes to: everything the bridge sends this user."""
    return f"{PREFIX}/u/{user}/down/#"


def up_all(user: str) -> str:
    return f"{PREFIX}/u/{user}/up/#"


def presence(user: str) -> str:
    """The retired retained topic of ``user``'s presence (see :data:`ALL_PRESENCE`)."""
    return f"{PREFIX}/presence/{user}"


def down_presence(user: str) -> str:
    return down(user, "presence")


@dataclass(frozen=True, slots=True)
class UserTopic:
    """A parsed ``chat/v1/u/{user}/{direction}/{kind}`` topic."""

    user: str
    direction: Literal["up", "down"]
    kind: str


_USER_TOPIC_RE: Final = re.compile(rf"^{re.escape(PREFIX)}/u/([^/]+)/(up|down)/([^/]+)$")


def parse_user_topic(topic: str) -> UserTopic | None:
    """Split a per-user topic into its parts; ``None`` if it is not one."""
    m = _USER_TOPIC_RE.fullmatch(topic)
    if m is None:
        return None
    direction: Literal["up", "down"] = "up" if m.group(2) == "up" else "down"
    return UserTopic(user=m.group(1), direction=direction, kind=m.group(3))


_UPLINK_RE: Final = re.compile(rf"^{re.escape(PREFIX)}/u/([^/]+)/up(?:/.*)?$", re.DOTALL)


def uplink_sender(topic: str) -> str | None:
    """Whose uplink this is, even when the rest of the topic is no uplink kind we know.

    The broker lets only ``{user}`` publish under ``chat/v1/u/{user}/up/#``, so the
    fourth level names the publisher of ``up/msg/x`` or ``up/foo`` too, and the
    bridge can tell them ``unknown_topic`` instead of dropping their publish unseen.
    """
    m = _UPLINK_RE.fullmatch(topic)
    return None if m is None else m.group(1)


def matches(topic: str, topic_filter: str) -> bool:
    """Whether a concrete topic matches an MQTT subscription filter (MQTT 3.1.1 4.7).

    A wildcard first level never matches a topic that starts with ``$`` (4.7.2), so
    ``#`` does not reach ``$SYS/...``. The one matcher of the code base: the ACL
    uses it, and the tests' oracles (``tests/test_acl_matrix.py``, the broker's topic
    index in ``tests/test_topic_index.py``) check against it.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    # A topic is a filter without wildcards: the filter matches it if it covers it.
    return covers(topic, topic_filter)


def covers(topic_filter: str, allowed: str) -> bool:
    """Whether every topic the filter could match is matched by ``allowed``.

    This is the subscribe check: ``chat/v1/u/bob/down/msg`` is covered by
    ``chat/v1/u/bob/down/#``, but ``chat/v1/u/+/down/#`` and ``#`` are not.
    """
    f = topic_filter.split("/")
    a = allowed.split("/")
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(f):
            return False
        if f[i] == "#":
            return False
        if level == "+":
            continue
        if f[i] != level:
            return False
    return len(f) == len(a)
