"""The options more than one command takes, declared once as ``Annotated`` aliases.

The same option has the same name, variable and help everywhere: ``--mqtt-port`` /
``MQCHAT_MQTT_PORT`` starts ``up``'s broker on a port and points ``send`` at it.
Options that always go together are the fields of a dataclass, and :func:`grouped`
gives them to each command as one argument.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final

import typer

Command = Callable[..., None]

DEFAULT_DATA_DIR: Final = Path(".mqchat")
DEFAULT_MQTT_PORT: Final = 1883
DEFAULT_API_URL: Final = "http://127.0.0.1:8000"

CONNECTION_PANEL: Final = "Connection"
MOSQUITTO_PANEL: Final = "mosquitto (production broker)"


def _option(name: str, *aliases: str, panel: str | None = CONNECTION_PANEL, **kwargs: Any) -> Any:
    """``typer.Option`` for ``--name`` (and deprecated ``aliases``), read from the variable
    ``MQCHAT_`` + its name (``--tls-ca``: ``MQCHAT_TLS_CA``), the aliases' after it."""
    flags = (name, *aliases)
    envvars = [f"MQCHAT_{flag.removeprefix('--').replace('-', '_').upper()}" for flag in flags]
    return typer.Option(*flags, envvar=envvars, rich_help_panel=panel, **kwargs)


HostOption = Annotated[str, _option("--host", help="Broker host.")]
# The same name as `up --mqtt-port`: one setting starts the broker on a port and points
# every command at it. --port / MQCHAT_PORT are deprecated aliases.
PortOption = Annotated[
    int, _option("--mqtt-port", "--port", help="Broker MQTT port (--port is a deprecated alias).")
]
UserOption = Annotated[str, _option("--user", help="Your username.")]
PasswordOption = Annotated[
    str,
    _option(
        "--password",
        prompt=True,
        hide_input=True,
        show_default=False,
        help="Your password; asked for (hidden) when not given.",
    ),
]
TlsOption = Annotated[
    bool,
    _option(
        "--tls",
        help="Connect over TLS, trusting the system's CAs; --mqtt-port is then a TLS "
        "listener's (8883, or the wss one with --websockets).",
    ),
]
TlsCaOption = Annotated[
    Path | None,
    _option(
        "--tls-ca",
        dir_okay=False,
        show_default=False,
        help="Connect over TLS, trusting the CA certificate(s) in this PEM file "
        "(a private CA). Implies --tls.",
    ),
]
WebsocketsOption = Annotated[
    bool,
    _option(
        "--websockets",
        help="MQTT over WebSocket (path /mqtt); --mqtt-port is then the WebSocket listener's.",
    ),
]
DeviceOption = Annotated[
    str,
    _option(
        "--device",
        help="Names this device. The broker keeps one session (and offline queue) per "
        "user and device, and a second connection as the same device takes it over. "
        "Each command has its own default (cli-listen, cli-chat), so `listen` and "
        "`chat` run side by side; two of one command at once need a --device each.",
    ),
]
ApiUrlOption = Annotated[
    str, _option("--api-url", help="The history API (`mqchat up --api-port`).")
]
DataDirOption = Annotated[
    Path,
    _option(
        "--data-dir",
        panel=None,
        file_okay=False,
        help="Where `mqchat up` keeps the SQLite database, secrets and logs.",
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    _option(
        "--database-url",
        panel=None,
        show_default=False,
        help="sqlite:///PATH or postgresql://... [default: the SQLite file in --data-dir]",
    ),
]
MosquittoHostOption = Annotated[str, _option("--mosquitto-host", panel=MOSQUITTO_PANEL)]
MosquittoPortOption = Annotated[int, _option("--mosquitto-port", panel=MOSQUITTO_PANEL)]
# USERNAME as in the API's MQCHAT_API_MOSQUITTO_ADMIN_USERNAME and the bridge's
# MQCHAT_BRIDGE_USERNAME; the ..._USER spellings are deprecated aliases.
MosquittoAdminUserOption = Annotated[
    str,
    _option(
        "--mosquitto-admin-username",
        "--mosquitto-admin-user",
        panel=MOSQUITTO_PANEL,
        help="mosquitto's dynamic-security admin account (--mosquitto-admin-user is a "
        "deprecated alias).",
    ),
]
MosquittoAdminPasswordOption = Annotated[
    str | None,
    _option(
        "--mosquitto-admin-password",
        panel=MOSQUITTO_PANEL,
        show_default=False,
        help="When given, accounts are also created in mosquitto (which keeps its own).",
    ),
]

# The bridge's service account, named as the bridge's own settings name it, for the
# commands that write a broker's first accounts (mosquitto bootstrap, rabbitmq configure).
BridgeUserOption = Annotated[str, typer.Option("--bridge-user", envvar="MQCHAT_BRIDGE_USERNAME")]
BridgePasswordOption = Annotated[
    str | None,
    typer.Option(
        "--bridge-password",
        envvar="MQCHAT_BRIDGE_PASSWORD",
        show_default=False,
        help="Asked for when not given.",
    ),
]


def grouped(group: type[Any], name: str, **defaults: Any) -> Callable[[Command], Command]:
    """Replace the command's ``name: group`` argument by the options ``group`` declares.

    ``group`` is a dataclass whose fields are annotated with options (the aliases
    above). typer reads a command's options from its signature, and has no way to
    group several into one argument: this gives it the signature it reads, and the
    command the dataclass back. ``defaults`` are this command's own defaults for some
    of the fields.
    """
    hints = typing.get_type_hints(group, include_extras=True)
    fields = dataclasses.fields(group)
    options = [
        inspect.Parameter(
            field.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=hints[field.name],
            default=defaults.get(
                field.name,
                inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default,
            ),
        )
        for field in fields
    ]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = [param for param in signature.parameters.values() if param.name != name]

        @functools.wraps(command)
        def with_group(**kwargs: Any) -> None:
            values = {field.name: kwargs.pop(field.name) for field in fields}
            command(**{name: group(**values)}, **kwargs)

        with_group.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own, *options]
        )
        return with_group

    return decorate
