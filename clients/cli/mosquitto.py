"""``mqchat mosquitto``: set up the production broker's first accounts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.dynsec import Credentials, write_dynsec_bootstrap
from protocol import errors
from store import accounts

from .options import BridgePasswordOption, BridgeUserOption
from .output import EXIT_CONFIG, fail, refused

app = typer.Typer(help="Set up the production broker.", no_args_is_help=True)


@app.command("bootstrap")
def bootstrap(
    out: Annotated[
        Path,
        typer.Option("--out", help="The dynamic-security.json that mosquitto.conf names."),
    ],
    admin_user: Annotated[
        str,
        typer.Option(
            "--admin-user",
            envvar=["MQCHAT_MOSQUITTO_ADMIN_USERNAME", "MQCHAT_MOSQUITTO_ADMIN_USER"],
            help="The dynamic-security admin account to create.",
        ),
    ] = "mqchat-admin",
    admin_password: Annotated[
        str | None,
        typer.Option(
            "--admin-password",
            envvar="MQCHAT_MOSQUITTO_ADMIN_PASSWORD",
            show_default=False,
            help="Asked for when not given.",
        ),
    ] = None,
    bridge_user: BridgeUserOption = "mqchat-bridge",
    bridge_password: BridgePasswordOption = None,
) -> None:
    """Write mosquitto's first dynamic-security file: the admin and the bridge accounts.

    Users are added later by `mqchat user add` / `POST /v1/users`, over the broker's
    $CONTROL API. An existing file is never overwritten (it holds every account).
    mosquitto.conf also needs the client-id plugin (`make mosquitto-plugin`,
    docs/operations.md), with these two accounts in its plugin_opt_exempt_users.
    """
    if admin_password is None:
        admin_password = typer.prompt("Admin password", hide_input=True, confirmation_prompt=True)
    if bridge_password is None:
        bridge_password = typer.prompt("Bridge password", hide_input=True, confirmation_prompt=True)
    for who, secret in (("admin", admin_password), ("bridge", bridge_password)):
        if len(secret) < accounts.MIN_PASSWORD_CHARS:
            refused(errors.WEAK_PASSWORD, f"the {who} password is too short")
    try:
        write_dynsec_bootstrap(
            out,
            admin=Credentials(admin_user, admin_password),
            bridge=Credentials(bridge_user, bridge_password),
        )
    except FileExistsError:
        fail(EXIT_CONFIG, f"{out} exists; it holds every account, so it is not overwritten")
    typer.echo(f"wrote {out} (admin {admin_user}, bridge {bridge_user})")
    typer.echo(
        "mosquitto.conf also loads mqchat's client-id plugin: build it with "
        "`make mosquitto-plugin` and install it as docs/operations.md says; its "
        f"plugin_opt_exempt_users must name {admin_user} and {bridge_user}"
    )
