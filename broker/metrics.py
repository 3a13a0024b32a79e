"""The embedded broker's metrics: who is connected, who was refused and why, what it relays.

Gauges are read from amqtt's own tables when Prometheus scrapes, so they cost nothing
between scrapes; the counters are one increment per CONNECT or per relayed message.
mosquitto's equivalents come from its ``$SYS`` topics (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

#: The reasons of ``mqchat_broker_signin_refusals_total``: a fixed set.
REFUSAL_REASONS: Final = (
    "no_credentials",  # CONNECT without username or password
    "bad_credentials",  # wrong password, unknown or disabled account
    "client_id",  # a client id that is not the user's (alice or alice:...)
    "throttled",  # too many failures or sign-ins of the user or source
    "busy",  # too many sign-ins at once (store.signin)
    "connect_rate",  # too many new connections from the source
    "will",  # a last will outside the user's ACL
    "sessions",  # MQCHAT_BROKER_MAX_SESSIONS_PER_USER connected already
    "identifier_rejected",  # an empty client id with a persistent session
    "malformed",  # not an MQTT 3.1.1 CONNECT, or too large
    "no_connect",  # no CONNECT within MQCHAT_BROKER_CONNECT_TIMEOUT
)


class BrokerMetrics:
    """The embedded broker's metrics on ``registry``; the gauges read what the
    callables return (amqtt's tables) at scrape time."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        connections: Callable[[], int],
        sessions: Callable[[], int],
        retained: Callable[[], int],
        queued: Callable[[], int],
    ) -> None:
        counter = Counter(
            "mqchat_broker_signin_refusals",
            "CONNECTs refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.refusals = {reason: counter.labels(reason) for reason in REFUSAL_REASONS}
        self.signins = Counter(
            "mqchat_broker_signins", "CONNECTs admitted (users and services).", registry=registry
        )
        self.relayed = Counter(
            "mqchat_broker_relayed_messages",
            "Publishes taken for relaying to subscribers (rate(): relays per second).",
            registry=registry,
        )
        for name, text, read in (
            ("mqchat_broker_connections", "Clients connected now.", connections),
            ("mqchat_broker_sessions", "Sessions held, connected or kept while away.", sessions),
            ("mqchat_broker_retained_messages", "Retained messages held.", retained),
            (
                "mqchat_broker_queued_messages",
                "Messages queued for disconnected persistent sessions.",
                queued,
            ),
        ):
            Gauge(name, text, registry=registry).set_function(read)

    def refused(self, reason: str) -> None:
        self.refusals[reason].inc()
