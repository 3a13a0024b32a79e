"""``mqchat rabbitmq``: the per-deployment files of a RabbitMQ cluster."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from broker.rabbitmq import write_cluster_files
from core.dynsec import Credentials
from protocol import errors
from store import accounts

from .options import BridgePasswordOption, BridgeUserOption
from .output import EXIT_CONFIG, fail, refused

app = typer.Typer(help="Set up a RabbitMQ cluster.", no_args_is_help=True)

#: What a path segment of the broker-auth URL may hold unescaped (RFC 3986's unreserved).
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")


@app.command("configure")
def configure(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The directory the nodes read: RABBITMQ_CONFIG_FILES is its *.conf.",
        ),
    ],
    nodes: Annotated[
        str,
        typer.Option(
            "--nodes",
            envvar="MQCHAT_RABBITMQ_NODES",
            help="Every node's name, comma-separated: rabbit@host1,rabbit@host2,...",
        ),
    ],
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api-url",
            envvar="MQCHAT_RABBITMQ_API_URL",
            help="The history API as the nodes reach it (http://api:8000); its "
            "broker-auth endpoints answer for users. Unset: service accounts only.",
        ),
    ] = None,
    broker_auth_secret: Annotated[
        str | None,
        typer.Option(
            "--broker-auth-secret",
            envvar="MQCHAT_API_BROKER_AUTH_SECRET",
            show_default=False,
            help="The API's MQCHAT_API_BROKER_AUTH_SECRET (needed with --api-url).",
        ),
    ] = None,
    bridge_user: BridgeUserOption = "mqchat-bridge",
    bridge_password: BridgePasswordOption = None,
) -> None:
    """Write a RabbitMQ cluster's own config and its definitions file (the bridge's
    account) into OUT.

    Every node runs with the repository's broker/rabbitmq-node/rabbitmq.conf as its main
    config and these beside it: the peers (classic config discovery), the definitions
    file, the history API's broker-auth URL (which holds the secret) and console
    logging. Existing files are replaced: the nodes import the definitions at every
    boot, so a new bridge password holds after a restart. docs/operations.md, "RabbitMQ
    cluster".
    """
    peers = [name.strip() for name in nodes.split(",") if name.strip()]
    if not peers or any("@" not in name for name in peers):
        fail(EXIT_CONFIG, f"--nodes: node names as rabbit@host, comma-separated, not {nodes!r}")
    auth_http_url = None
    if api_url is not None:
        if not broker_auth_secret:
            fail(EXIT_CONFIG, "--api-url needs the API's MQCHAT_API_BROKER_AUTH_SECRET")
        if URL_SAFE.fullmatch(broker_auth_secret) is None:
            fail(
                EXIT_CONFIG,
                "MQCHAT_API_BROKER_AUTH_SECRET goes into a URL: letters, digits and -._~ only",
            )
        auth_http_url = f"{api_url.rstrip('/')}/broker-auth/{broker_auth_secret}"
    if bridge_password is None:
        bridge_password = typer.prompt("Bridge password", hide_input=True, confirmation_prompt=True)
    if len(bridge_password) < accounts.MIN_PASSWORD_CHARS:
        refused(errors.WEAK_PASSWORD, "the bridge password is too short")
    config, definitions = write_cluster_files(
        out,
        peers,
        Credentials(bridge_user, bridge_password),
        auth_http_url,
        # In a container a node logs to its standard output (`docker logs`).
        extra_lines=["log.console = true"],
    )
    typer.echo(f"wrote {config} ({len(peers)} nodes) and {definitions} (bridge {bridge_user})")
