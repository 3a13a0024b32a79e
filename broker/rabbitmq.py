"""RabbitMQ in production: each node's configuration and the definitions file of the
service accounts (``docs/operations.md``, "RabbitMQ cluster").

A node reads two files: ``broker/rabbitmq-node/rabbitmq.conf``, the settings of every
node wherever it runs (compose.yaml mounts it; the tests' cluster runs with it), and
what :func:`render_cluster_config` renders for one deployment (the nodes' names, the
definitions file, the history API's broker-auth URL, which holds a secret).
:func:`write_cluster_files` writes the latter and the definitions file
(``mqchat rabbitmq configure``, compose's ``rabbitmq-init``).

Users are not RabbitMQ's: its HTTP auth backend asks the history API about them
(``history_api/broker_auth.py``), so only the service accounts live in RabbitMQ, loaded
from a definitions file at boot. The tests start their cluster from these
(``tests/support/rabbitmq.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.dynsec import Credentials

#: The files every node runs with, in the repository (not in the installed package:
#: compose.yaml mounts them and the tests' cluster reads them).
NODE_DIR = Path(__file__).resolve().with_name("rabbitmq-node")
#: The settings of every node: its main ``rabbitmq.conf``.
SHARED_CONFIG = NODE_DIR / "rabbitmq.conf"
#: The plugins every node runs (``RABBITMQ_ENABLED_PLUGINS_FILE``).
ENABLED_PLUGINS = NODE_DIR / "enabled_plugins"
#: What :func:`write_cluster_files` writes in its directory.
CLUSTER_CONFIG_NAME = "mqchat-cluster.conf"
DEFINITIONS_NAME = "definitions.json"


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


def render_cluster_config(
    peers: Sequence[str],
    definitions_file: Path,
    auth_http_url: str | None,
    listeners: NodePorts | None = None,
) -> str:
    """What one deployment's nodes read beside :data:`SHARED_CONFIG`.

    Args:
        peers: every node's name (``rabbit@host``).
        auth_http_url: the history API's broker-auth base, its secret included
            (``http://api:8000/broker-auth/<secret>``); None: service accounts only.
        listeners: where the node listens; None: RabbitMQ's defaults (5672 and 1883 on
            every interface, as in a container).
    """
    lines = []
    if listeners is not None:
        lines += [
            f"listeners.tcp.default = {listeners.host}:{listeners.amqp_port}",
            f"mqtt.listeners.tcp.default = {listeners.host}:{listeners.mqtt_port}",
        ]
    lines += [
        f"load_definitions = {definitions_file}",
        "cluster_formation.peer_discovery_backend = classic_config",
        *(f"cluster_formation.classic_config.nodes.{i} = {p}" for i, p in enumerate(peers, 1)),
        # Internal accounts (the service accounts) first, then the cache of the API's
        # answers (SHARED_CONFIG's auth_cache settings).
        "auth_backends.1 = internal",
    ]
    if auth_http_url is not None:
        lines += [
            "auth_backends.2 = cache",
            *(
                f"auth_http.{kind}_path = {auth_http_url}/{kind}"
                for kind in ("user", "vhost", "resource", "topic")
            ),
        ]
    return "\n".join(lines) + "\n"


def write_cluster_files(
    out: Path,
    peers: Sequence[str],
    bridge: Credentials,
    auth_http_url: str | None,
    extra_lines: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write the definitions file (the bridge's account) and the cluster's config
    (:func:`render_cluster_config`, naming that file, then ``extra_lines``) into
    ``out``, replacing earlier ones: the nodes import the definitions at every boot, so
    a changed password holds after a restart. Both hold secrets (a password hash, the
    broker-auth secret): readable by the nodes' account, so by everyone who can read
    ``out``, which only the nodes should mount.

    Returns the config file and the definitions file."""
    out.mkdir(parents=True, exist_ok=True)
    definitions_file = out / DEFINITIONS_NAME
    config_file = out / CLUSTER_CONFIG_NAME
    config = render_cluster_config(peers, definitions_file, auth_http_url)
    for path, text in (
        (definitions_file, json.dumps(definitions(bridge), indent=2) + "\n"),
        (config_file, config + "".join(f"{line}\n" for line in extra_lines)),
    ):
        staging = path.with_name(f".{path.name}.new")
        staging.write_text(text)
        staging.chmod(0o644)
        os.replace(staging, path)
    return config_file, definitions_file
