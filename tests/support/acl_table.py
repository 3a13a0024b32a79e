"""The topic table of DESIGN.md restated as an oracle, and the probes that test it.

One copy for every broker's isolation matrix (``tests/test_acl_matrix.py`` on
mosquitto and the embedded broker, ``tests/test_rabbitmq_isolation.py`` on every node
of the RabbitMQ cluster): a change of the contract's topics changes both at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol import topics

from .clients import BRIDGE

UP_KINDS = ("msg", "ack", "typing", "presence")
DOWN_KINDS = ("msg", "receipt", "typing", "error", "presence")

#: "{me}" is the connected user.
ALLOWED: dict[str, dict[str, tuple[str, ...]]] = {
    "user": {
        "publish": ("chat/v1/u/{me}/up/#",),
        "subscribe": ("chat/v1/u/{me}/down/#",),
    },
    "bridge": {
        "publish": ("chat/v1/u/+/down/#",),
        "subscribe": ("chat/v1/u/+/up/#",),
    },
}


def _samples(topic_filter: str) -> list[str]:
    """Topics that stand for everything ``topic_filter`` can match.

    A wildcard level becomes a value no literal level equals (NUL), so only a
    wildcard in the allowing pattern can match it; ``#`` stands for zero, one and
    two levels.
    """
    wild = "\x00"
    levels = [wild if level == "+" else level for level in topic_filter.split("/")]
    if levels[-1] != "#":
        return ["/".join(levels)]
    parent = levels[:-1]
    return ["/".join(parent), "/".join([*parent, wild]), "/".join([*parent, wild, wild])]


def may(actor: str, action: str, topic: str) -> bool:
    kind = "bridge" if actor == BRIDGE else "user"
    patterns = [p.replace("{me}", actor) for p in ALLOWED[kind][action]]
    if action == "publish":
        return any(topics.matches(topic, p) for p in patterns)
    # A subscription is granted only if it cannot reach past what is allowed.
    return all(any(topics.matches(s, p) for p in patterns) for s in _samples(topic))


def observable_topics(users: Iterable[str]) -> list[str]:
    """Every topic some entitled observer can watch: the publish probes' targets."""
    out = []
    for user in users:
        out += [f"chat/v1/u/{user}/up/{kind}" for kind in UP_KINDS]
        out += [f"chat/v1/u/{user}/down/{kind}" for kind in DOWN_KINDS]
    return out


def subscribe_filters(users: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Each user's own and others' topics, every wildcard shape, and ``extra``."""
    filters = []
    for user in users:
        base = f"chat/v1/u/{user}"
        filters += [f"{base}/up/{kind}" for kind in UP_KINDS]
        filters += [f"{base}/down/{kind}" for kind in DOWN_KINDS]
        filters += [f"{base}/up/#", f"{base}/up/+", f"{base}/down/#", f"{base}/down/+"]
        filters += [f"{base}/down", f"{base}/down/msg/deeper", f"{base}/#", f"{base}/+/msg"]
        filters.append(f"chat/v1/presence/{user}")
    filters += [
        "#",
        "+/#",
        "+/+/+/+/+/+",
        "+/v1/u/+/down/#",
        "chat/#",
        "chat/v1/#",
        "chat/v1/u/#",
        "chat/v1/u/+/up/#",
        "chat/v1/u/+/down/#",
        "chat/v1/u/+/+/+",
        "chat/v1/presence/+",
        "chat/v1/presence/#",
        "$SYS/#",
        *extra,
    ]
    return filters
