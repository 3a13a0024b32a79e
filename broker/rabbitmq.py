"""RabbitMQ in production: each node's ``rabbitmq.conf`` and the definitions file of
the service accounts (``docs/operations.md``, "RabbitMQ cluster").

Users are not RabbitMQ's: its HTTP auth backend asks the history API about them
(``history_api/broker_auth.py``), so only the service accounts live in RabbitMQ, loaded
from a definitions file at boot. The tests start their cluster from these
(``tests/support/rabbitmq.py``).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.dynsec import Credentials

#: The plugins every node runs.
PLUGINS = (
    "rabbitmq_mqtt",
    "rabbitmq_consistent_hash_exchange",
    "rabbitmq_auth_backend_cache",
    "rabbitmq_auth_backend_http",
)


@dataclass(frozen=True)
class NodePorts:
    """Where one node listens."""

    host: str
    amqp_port: int = 5672
    mqtt_port: int = 1883


def password_hash(password: str) -> str:
    """``password`` as RabbitMQ's definitions file takes it
    (``rabbit_password_hashing_sha256``: base64 of a 4-byte salt and
    SHA-256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


#: The bridge's topics on ``amq.topic`` (routing keys: MQTT's ``/`` is ``.``, ``+`` is
#: ``*``; usernames hold no ``.`` on RabbitMQ): it publishes downlinks (presence among
#: them, on each contact's ``down/presence``) and subscribes to uplinks, as
#: ``protocol.acl.BRIDGE_RULES`` says for the other brokers.
BRIDGE_TOPICS = {
    "write": r"^chat\.v1\.u\.[^.*#]+\.down(\..+)?$",
    "read": r"^chat\.v1\.u\.[^.#]+\.up(\..*)?$",
}


def definitions(bridge: Credentials, *operators: Credentials) -> dict[str, object]:
    """The vhost and the service accounts: full rights on ``/`` (they are ours), the
    bridge held to its topics (:data:`BRIDGE_TOPICS`)."""
    accounts = (bridge, *operators)
    return {
        "vhosts": [{"name": "/"}],
        "users": [
            {
                "name": account.username,
                "password_hash": password_hash(account.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"],
            }
            for account in accounts
        ],
        "permissions": [
            {"user": a.username, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
            for a in accounts
        ],
        "topic_permissions": [
            {"user": bridge.username, "vhost": "/", "exchange": "amq.topic", **BRIDGE_TOPICS}
        ],
    }


def render_config(
    node: NodePorts, peers: Sequence[str], definitions_file: Path, auth_http_url: str | None
) -> str:
    """The rabbitmq.conf of one node.

    Args:
        peers: every node's name (``rabbit@host``), this one's included.
        auth_http_url: the history API's broker-auth base
            (``http://api:8000/broker-auth/<secret>``); None: service accounts only.
    """
    lines = [
        f"listeners.tcp.default = {node.host}:{node.amqp_port}",
        f"mqtt.listeners.tcp.default = {node.host}:{node.mqtt_port}",
        "mqtt.allow_anonymous = false",
        "mqtt.vhost = /",
        "mqtt.exchange = amq.topic",
        # Persistent sessions as Raft-replicated quorum queues: they survive the
        # SIGKILL of the node their device was connected to.
        "mqtt.durable_queue_type = quorum",
        f"load_definitions = {definitions_file}",
        "cluster_formation.peer_discovery_backend = classic_config",
        *(f"cluster_formation.classic_config.nodes.{i} = {p}" for i, p in enumerate(peers, 1)),
        # A 3-node cluster keeps going with one node down, and a node cut off from the
        # majority stops serving rather than diverging.
        "cluster_partition_handling = pause_minority",
        "log.file.level = info",
        "log.console = false",
    ]
    if auth_http_url is None:
        lines.append("auth_backends.1 = internal")
    else:
        lines += [
            "auth_backends.1 = internal",
            "auth_backends.2 = cache",
            "auth_cache.cached_backend = http",
            "auth_cache.cache_ttl = 15000",
            "auth_http.http_method = post",
            f"auth_http.user_path = {auth_http_url}/user",
            f"auth_http.vhost_path = {auth_http_url}/vhost",
            f"auth_http.resource_path = {auth_http_url}/resource",
            f"auth_http.topic_path = {auth_http_url}/topic",
        ]
    return "\n".join(lines) + "\n"
