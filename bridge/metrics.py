"""The bridge's metrics: what it received, stored, refused, and how long each step took.

Every label has a fixed set of values (uplink kinds, error codes, database turn
kinds, conversation kinds): nothing grows with users or conversations.

Kept off the hot path's budget: counters of one batch are summed in plain ints and
added once per batch; the queue depth and the connection state are read only when
Prometheus scrapes. Two histogram observations per message (arrival to commit,
arrival to PUBACK, about a microsecond each) and a dict write are the per-message
cost; the undelivered backlog is one bounded query every few seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Seconds: from a millisecond (a batch that found the database idle) to a minute (a
#: database that was away); the default buckets stop at 10 s.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Seconds from commit to a device's delivered ack: a phone in a pocket takes minutes.
DELIVERY_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
)  # fmt: skip
#: Uplinks in one batch, up to MQCHAT_BRIDGE_MAX_BATCH's default (256) and beyond.
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: The kinds of ``mqchat_bridge_uplinks_total``: the uplink topics, and ``invalid`` for
#: one that did not decode.
UPLINK_KINDS: Final = ("msg", "group", "ack", "typing", "presence", "invalid")
#: The ``older_than`` buckets of ``mqchat_undelivered_messages``, in seconds; each
#: counts every undelivered message at least that old (cumulative, like ``le``).
BACKLOG_AGES: Final = (("0s", 0), ("1m", 60), ("5m", 300), ("1h", 3600))


class BridgeMetrics:
    """The bridge's metrics on ``registry`` (one per bridge, see ``core.metrics``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        queue_depth: Callable[[], int],
        broker_connected: Callable[[], bool],
        partitions: int,
    ) -> None:
        self.uplinks = Counter(
            "mqchat_bridge_uplinks",
            "Uplinks received, by kind (invalid: did not decode).",
            ["kind"],
            registry=registry,
        )
        self.uplink_kinds = {kind: self.uplinks.labels(kind) for kind in UPLINK_KINDS}
        self.stored = Counter(
            "mqchat_bridge_messages_stored",
            "Messages and group changes stored for the first time.",
            registry=registry,
        )
        self.redeliveries = Counter(
            "mqchat_bridge_redeliveries",
            "Messages received again after they were stored (a resend or a broker "
            "redelivery), answered with the stored message and not stored twice.",
            registry=registry,
        )
        self.refusals = Counter(
            "mqchat_bridge_refusals",
            "Uplinks answered with an error on down/error, by its code.",
            ["code"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "mqchat_bridge_batch_size",
            "Uplinks taken in one batch (group commit).",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.db_turn = Histogram(
            "mqchat_bridge_db_turn_seconds",
            "One database turn, waiting for its thread included, by what it wrote.",
            ["what"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commit = Histogram(
            "mqchat_bridge_arrival_to_commit_seconds",
            "From an uplink message's arrival at the bridge to the commit that stored it.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.puback = Histogram(
            "mqchat_bridge_arrival_to_puback_seconds",
            "From an uplink message's arrival to the broker's PUBACK of everything "
            "published for its batch (then the uplinks are acknowledged).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.delivered = Histogram(
            "mqchat_commit_to_delivered_seconds",
            "From a message's commit to the first delivered ack of a recipient's "
            "devices, by conversation kind (sampled: each conversation's newest "
            "message, where this bridge committed it).",
            ["kind"],
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )
        self.delivered_kinds = {kind: self.delivered.labels(kind) for kind in ("direct", "group")}
        self.undelivered = Gauge(
            "mqchat_undelivered_messages",
            "Messages of the last day stored and not yet delivered to any device of "
            "some recipient, at least older_than old (cumulative).",
            ["older_than"],
            registry=registry,
        )
        self.online_users = Gauge(
            "mqchat_online_users",
            "Users with a device online, as presence has them (counted with the backlog).",
            registry=registry,
        )
        self.online_devices = Gauge(
            "mqchat_online_devices",
            "Devices online, as presence has them (counted with the backlog).",
            registry=registry,
        )
        self.published = Counter(
            "mqchat_bridge_published",
            "Downlinks published (messages to every member's devices, receipts, "
            "errors, presence), acknowledged by the broker or not yet.",
            registry=registry,
        )
        self.backlog_checked = Gauge(
            "mqchat_undelivered_checked_timestamp_seconds",
            "When mqchat_undelivered_messages was last computed (Unix time).",
            registry=registry,
        )
        queue = Gauge(
            "mqchat_bridge_queue_depth",
            "Uplinks received and not yet taken into a batch.",
            registry=registry,
        )
        queue.set_function(queue_depth)
        connected = Gauge(
            "mqchat_bridge_broker_connected",
            "1 while the bridge's MQTT connection is up.",
            registry=registry,
        )
        connected.set_function(lambda: float(broker_connected()))
        Gauge(
            "mqchat_bridge_partitions_owned",
            "Partitions of the uplinks this instance handles (sum over instances: "
            "should equal mqchat_bridge_partitions).",
            registry=registry,
        ).set(1)
        Gauge(
            "mqchat_bridge_partitions",
            "Partitions the uplinks are split into (MQCHAT_BRIDGE_PARTITIONS).",
            registry=registry,
        ).set(partitions)
