"""Settings of the bridge daemon, read once from ``MQCHAT_BRIDGE_*`` variables."""

from __future__ import annotations

from limits import parse_many
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.daemon import parse_addr
from protocol import MAX_BODY_CHARS, MAX_PAYLOAD_BYTES
from store.devices import DEFAULT_MAX_DEVICES
from store.groups import DEFAULT_MAX_MEMBERS
from store.presence import DEFAULT_GROUP_LIMIT, DEFAULT_MAX_CONTACTS, GROUP_LIMIT_VARIABLE

from .faults import CRASH_AT_PATTERN


class BridgeSettings(BaseSettings):
    # validate_by_name: fields set by another daemon's variable too (an alias) are
    # still given by name in code (``core.daemon.build``).
    model_config = SettingsConfigDict(
        env_prefix="MQCHAT_BRIDGE_", extra="ignore", validate_by_name=True
    )

    database_url: str
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    #: More nodes of a clustered broker, ``host:port`` comma-separated (1883 where no
    #: port is given): the MQTT link (the downlinks, and the uplinks where they come
    #: over MQTT) moves to the next one when its node cannot be reached or is lost,
    #: as the SDK's ``other_brokers`` do.
    mqtt_other_addresses: str | None = None
    username: str = "mqchat-bridge"
    #: No default: the service account's password comes from configuration only.
    password: SecretStr
    #: Fixed, so the broker keeps this bridge's persistent session (and the uplinks
    #: queued for it) across restarts. Each instance needs its own.
    client_id: str = "mqchat-bridge-1"
    #: Several bridges share the work by sender: every instance receives every uplink
    #: (no shared subscriptions needed, so any broker will do) and handles only the
    #: senders with ``crc32(sender) % partitions == partition``; all of one sender's
    #: uplinks go through one instance, in order.
    partitions: int = Field(default=1, ge=1)
    partition: int = Field(default=0, ge=0)
    #: RabbitMQ: the nodes' AMQP listeners, ``host:port`` comma-separated. Set, the
    #: bridge takes uplinks from the cluster's uplink queues instead of an MQTT
    #: subscription (``bridge/amqp_source.py``): the broker gives each instance its
    #: partitions (``partitions`` instances, this one ``partition``), so no instance
    #: receives another's uplinks. Downlinks still go out over MQTT.
    amqp_addresses: str | None = None
    #: RabbitMQ: how many uplink queues the consistent-hash exchange spreads senders
    #: over; the same on every instance, and fixed once traffic flows (a change moves
    #: senders between queues while their older uplinks may still wait in the old one).
    amqp_queues: int = Field(default=16, ge=1)
    #: Seconds: the MQTT keepalive of its link, and on RabbitMQ its AMQP heartbeat.
    keepalive: int = Field(default=15, ge=5)
    #: Most uplinks stored by one write (group commit).
    max_batch: int = Field(default=256, ge=1)
    max_payload_bytes: int = Field(default=MAX_PAYLOAD_BYTES, ge=256)
    max_body_chars: int = Field(default=MAX_BODY_CHARS, ge=1)
    #: Messages one user may send, in ``limits`` notation; each item is a token
    #: bucket (burst up to the amount, then the rate; see ``ratelimit``). Above it
    #: the bridge answers ``rate_limited`` and stores nothing, and the SDK
    #: resends later. Generous for people, tight enough that one flooding account
    #: cannot crowd out the others.
    message_rate: str = "20/second;600/minute"
    #: Acks, typing and presence one user may send, each kind counted on its own, in
    #: the same notation. Checked before any database work: a refused uplink costs no
    #: database turn. An SDK sends a few of each a minute; reconnecting with many
    #: conversations it acks each once, within the burst.
    uplink_rate: str = "30/second;1200/minute"
    #: Device names one user may have (``store.devices``); a new one beyond it is
    #: refused with ``too_many_devices``.
    max_devices: int = Field(default=DEFAULT_MAX_DEVICES, ge=1)
    #: Most members of a group (WhatsApp's limit); adding beyond it, or creating a
    #: larger group, is refused with ``group_full``. Lowering it keeps existing
    #: members; it only refuses additions.
    group_max_members: int = Field(default=DEFAULT_MAX_MEMBERS, ge=1)
    #: A device not heard from for this long is taken offline even without its last
    #: will (the SDK announces itself every 120 s).
    presence_ttl: float = Field(default=300.0, gt=0)
    #: Groups up to this many members make their members each other's contacts, who
    #: are told each other's presence; larger groups do not (0: no group does, as in
    #: WhatsApp). 1:1 partners always are. ``MQCHAT_PRESENCE_GROUP_LIMIT``, read by
    #: the history API too.
    presence_group_limit: int = Field(
        default=DEFAULT_GROUP_LIMIT, ge=0, validation_alias=GROUP_LIMIT_VARIABLE
    )
    #: Most contacts one user's presence change goes to (1:1 partners first), and
    #: most states in one snapshot: the bound on a change's fan-out.
    presence_max_contacts: int = Field(default=DEFAULT_MAX_CONTACTS, ge=1)
    #: Seconds; a database turn (one batch's write, waiting for the worker thread
    #: included) that takes longer is logged as a warning: every message of the
    #: batch is late by that much.
    slow_turn: float = Field(default=0.25, gt=0)
    #: Seconds to keep trying to reach the broker at startup.
    startup_timeout: float = 30.0
    #: ``host:port`` of the listener for ``/metrics``, ``/livez`` and ``/readyz``
    #: (``core.metrics``); unset: none. Off by default because several bridges may
    #: run on one machine (one per partition) and each needs a port of its own;
    #: ``mqchat up`` turns it on.
    metrics_addr: str | None = None
    #: Seconds between two counts of the undelivered backlog
    #: (``mqchat_undelivered_messages``, ``store.backlog``; partition 0 counts).
    backlog_interval: float = Field(default=15.0, gt=0)

    @field_validator("metrics_addr")
    @classmethod
    def _addr_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_addr(value)  # ValueError names what is wrong
        return value

    @model_validator(mode="after")
    def _rate_parses(self) -> BridgeSettings:
        parse_many(self.message_rate)  # ValueError names what is wrong
        parse_many(self.uplink_rate)
        return self

    @model_validator(mode="after")
    def _addresses_parse(self) -> BridgeSettings:
        _ = self.amqp_nodes, self.mqtt_other_nodes  # a bad port raises ValueError
        return self

    @property
    def amqp_nodes(self) -> list[tuple[str, int]]:
        """``amqp_addresses`` as (host, port) pairs (5672 where no port is given)."""
        return _nodes(self.amqp_addresses, 5672)

    @property
    def mqtt_other_nodes(self) -> list[tuple[str, int]]:
        """``mqtt_other_addresses`` as (host, port) pairs (1883 where no port is given)."""
        return _nodes(self.mqtt_other_addresses, 1883)

    @model_validator(mode="after")
    def _partition_in_range(self) -> BridgeSettings:
        if self.partition >= self.partitions:
            raise ValueError(
                f"partition {self.partition} is not below partitions {self.partitions}"
            )
        return self

    #: Seconds to finish in-flight work on SIGTERM before giving up on it.
    shutdown_timeout: float = 10.0
    #: Test only: ``<point>:<n>`` kills the bridge at the n-th arrival at a point of
    #: its pipeline (see ``bridge/faults.py``). Never set it in production.
    crash_at: str | None = Field(default=None, pattern=CRASH_AT_PATTERN)


def _nodes(addresses: str | None, default_port: int) -> list[tuple[str, int]]:
    """``host:port,host`` as (host, port) pairs, ``default_port`` where none is given."""
    nodes = []
    for item in (addresses or "").split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), str(default_port)
        if not host:
            continue
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item.strip()!r} is not host or host:port")
        nodes.append((host, int(port)))
    return nodes
