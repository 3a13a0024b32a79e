"""Who may publish and subscribe where: the topic table of DESIGN.md as data.

Both brokers enforce these same rules. The embedded broker evaluates them in its
ACL plugin; for mosquitto they are turned into per-user dynamic-security roles.
``{user}`` stands for the connected username.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from . import topics

Action = Literal["publish", "subscribe"]


@dataclass(frozen=True, slots=True)
class Rule:
    action: Action
    pattern: str

    def for_user(self, user: str) -> str:
        return self.pattern.replace("{user}", user)


#: What an ordinary account may do: its own tree and nothing else. Presence is the
#: bridge's word (from each device's ``up/presence`` and last will), sent to each
#: contact's ``down/presence``, so nobody can fake another's state or follow a user
#: they share no conversation with.
USER_RULES: Final[tuple[Rule, ...]] = (
    Rule("publish", topics.up_all("{user}")),
    Rule("subscribe", topics.down_all("{user}")),
)

#: What the bridge's service account may do: read every uplink, write every downlink.
BRIDGE_RULES: Final[tuple[Rule, ...]] = (
    Rule("subscribe", topics.ALL_UPLINKS),
    Rule("publish", topics.ALL_DOWNLINKS),
)


def allowed(rules: tuple[Rule, ...], user: str, action: Action, topic: str) -> bool:
    """Whether ``user`` may perform ``action`` on ``topic`` (a filter when subscribing)."""
    for rule in rules:
        if rule.action != action:
            continue
        pattern = rule.for_user(user)
        if action == "publish":
            if topics.matches(topic, pattern):
                return True
        elif topics.covers(topic, pattern):
            return True
    return False


def retain_allowed(service: bool) -> bool:
    """Whether an account's publishes may be retained (stored and shown to every later
    subscriber), where its rules let it publish; ``service``: the bridge's account.

    Users retain nothing: a retained uplink would be replayed to the bridge every
    time it subscribes again. (The bridge retains nothing since presence left the
    retained ``chat/v1/presence/{user}``; its right stays so a retained publish of its
    own is no silent drop.) Both brokers enforce this for publishes and last wills
    (mosquitto through ``broker/mosquitto_clientid``).
    """
    return service


def client_id_allowed(user: str, client_id: str) -> bool:
    """Whether ``user`` may connect with ``client_id``: ``user`` or ``user:<anything>``.

    A client id names a broker session with its subscriptions and queued messages, so
    it is bound to its user: nobody else can resume (take over) it. Usernames cannot
    contain ``:``, so the prefix is unambiguous. Both brokers enforce this for users
    (mosquitto through ``broker/mosquitto_clientid``); service accounts are exempt.
    """
    return client_id == user or client_id.startswith(user + ":")
