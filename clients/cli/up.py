"""``mqchat up``: the whole stack on this machine, in one command, until Ctrl-C.

It checks its ports, migrates the database, then hands the daemons to
``core.supervisor.Supervisor``: the broker first (unless ``--mosquitto`` names one
already running), then the bridge, the API and the push daemon once the broker is ready.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer
from pydantic_settings import BaseSettings

from core.daemon import BRIDGE_READY_LOG, BROKER_READY_LOG, PUSH_READY_LOG, load
from core.supervisor import Child, Supervisor, accepts

from .database import migrate_for_up, shown, url_for
from .health import watch, write_endpoints
from .options import (
    DEFAULT_DATA_DIR,
    DEFAULT_MQTT_PORT,
    MOSQUITTO_PANEL,
    DatabaseUrlOption,
    DataDirOption,
    MosquittoAdminPasswordOption,
    MosquittoAdminUserOption,
)
from .output import EXIT_CONFIG, fail

SECRETS_FILE: Final = "secrets.json"
#: The push daemon's VAPID private key, made by it on its first start (mode 0600).
VAPID_KEY_FILE: Final = "vapid_private.pem"
BRIDGE_USERNAME: Final = "mqchat-bridge"

_S = TypeVar("_S", bound=BaseSettings)


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a service bound to ``host``."""
    wildcards = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104
    return wildcards.get(host, host)


def _bridge_password(data_dir: Path) -> str:
    """The embedded broker's password for the bridge: made once, then kept.

    Kept so that a restart of ``mqchat up`` (or a single child) finds the broker
    and the bridge agreeing; never in the code, where it would be everyone's.
    """
    return _secret(data_dir, "bridge_password")


def _secret(data_dir: Path, name: str) -> str:
    """The secret ``name`` of ``<data-dir>/secrets.json``: made on first use, then kept.

    A file from a version that had fewer secrets gets the missing one added.
    """
    path = data_dir / SECRETS_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            kept = json.loads(path.read_text())
            if name in kept:
                return str(kept[name])
            kept[name] = secrets.token_urlsafe(32)
            path.write_text(json.dumps(kept) + "\n")
            return str(kept[name])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            fail(EXIT_CONFIG, f"cannot read {path} ({exc!r}); delete it to make new secrets")
    made = {name: secrets.token_urlsafe(24 if name == "bridge_password" else 32)}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(made) + "\n")
    return made[name]


def free_port(host: str) -> int:
    """A port free on ``host`` now, for a child to bind in a moment."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="'--mosquitto'")
    return host.strip("[]"), int(port)


def _child(
    settings: BaseSettings,
    name: str,
    module: str,
    logs: Path,
    *,
    ready_line: str | None = None,
    ports: list[tuple[str, int]] | None = None,
    describe: Callable[[int], str] | None = None,
) -> Child:
    # The caller's environment passes through; the settings replace their daemon's
    # variables in it (they were read from it, with what this command decides on top).
    return Child(
        name,
        module,
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        logs / f"{name}.log",
        settings=settings,
        ready_line=ready_line,
        ports=ports or [],
        describe=describe,
        # A Ctrl-C in the terminal reaches only `mqchat up`, which then stops the
        # children in order, once each.
        own_session=True,
    )


def _settings(settings: type[_S], daemon: str, **values: Any) -> _S:
    """A daemon's settings, read from this environment as the daemon would read them,
    with ``values`` on top: a bad one is told now, by its variable, before any start."""
    loaded = load(settings, daemon, **values)
    if loaded is None:
        raise typer.Exit(EXIT_CONFIG)
    return loaded


def up(
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    host: Annotated[
        str, typer.Option("--host", help="The interface every service listens on.")
    ] = "127.0.0.1",
    mqtt_port: Annotated[
        int, typer.Option("--mqtt-port", envvar="MQCHAT_MQTT_PORT", help="MQTT over TCP.")
    ] = DEFAULT_MQTT_PORT,
    ws_port: Annotated[
        int, typer.Option("--ws-port", help="MQTT over WebSocket (browsers); 0 turns it off.")
    ] = 8083,
    api_port: Annotated[int, typer.Option("--api-port", help="The HTTP API.")] = 8000,
    database_url: DatabaseUrlOption = None,
    mosquitto: Annotated[
        str | None,
        typer.Option(
            "--mosquitto",
            metavar="HOST:PORT",
            envvar="MQCHAT_MOSQUITTO",
            show_default=False,
            help="Use this running mosquitto instead of the embedded broker (needs the "
            "bridge and admin passwords).",
            rich_help_panel=MOSQUITTO_PANEL,
        ),
    ] = None,
    mosquitto_bridge_password: Annotated[
        str | None,
        typer.Option(
            "--mosquitto-bridge-password",
            envvar="MQCHAT_BRIDGE_PASSWORD",
            show_default=False,
            help="Password of the bridge's account in mosquitto.",
            rich_help_panel=MOSQUITTO_PANEL,
        ),
    ] = None,
    mosquitto_admin_user: MosquittoAdminUserOption = "mqchat-admin",
    mosquitto_admin_password: MosquittoAdminPasswordOption = None,
    startup_timeout: Annotated[
        float,
        typer.Option("--startup-timeout", min=1, help="Seconds for each service to get ready."),
    ] = 30.0,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            min=0,
            help="Seconds each service gets to stop before it is killed.",
        ),
    ] = 10.0,
    metrics_port: Annotated[
        int,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65534,
            help="/metrics, /livez and /readyz of the bridge on this port and of the "
            "embedded broker on the next; 0 picks free ones (mqchat status finds them "
            "in the data dir). The API serves its own on --api-port.",
        ),
    ] = 0,
) -> None:
    """Run mqchat here, in one command: broker, bridge, HTTP API and push, until Ctrl-C.

    Needs nothing else: the embedded broker (amqtt) and a SQLite database in
    --data-dir, migrated on start. The bridge's broker password and the key of MQTT
    credentials are generated on the first start and kept in
    `<data-dir>/secrets.json` (mode 0600); the push daemon's VAPID key likewise in
    `<data-dir>/vapid_private.pem`.

    Each service is a child process whose output goes to `<data-dir>/logs/<name>.log`
    (appended; this terminal shows only where each service listens and what happens
    to it). A child that exits is restarted, at most 5 times a minute; then everything
    stops and up exits 1. A crashed bridge loses nothing: the broker redelivers what
    it had not acknowledged.

    Ctrl-C or SIGTERM stops the children (SIGTERM, then SIGKILL after
    --shutdown-timeout) and exits 0; a second Ctrl-C kills them at once (exit 130).

    --database-url postgresql://... and --mosquitto HOST:PORT use external services
    instead (the database is migrated; mosquitto is not started).
    """
    external = None
    if mosquitto is not None:
        external = _parse_host_port(mosquitto)
        if not mosquitto_bridge_password:
            raise typer.BadParameter(
                "needed with --mosquitto", param_hint="'--mosquitto-bridge-password'"
            )
        if not mosquitto_admin_password:
            raise typer.BadParameter(
                "needed with --mosquitto: mosquitto keeps its own accounts",
                param_hint="'--mosquitto-admin-password'",
            )
    binds = [("--api-port", api_port)]
    if external is None:
        binds += [("--mqtt-port", mqtt_port), ("--ws-port", ws_port)]
    if metrics_port:
        binds.append(("--metrics-port", metrics_port))
        if external is None:
            binds.append(("--metrics-port (+1, the broker's)", metrics_port + 1))
    ports = [port for _, port in binds if port]
    if len(set(ports)) != len(ports):
        raise typer.BadParameter("each service needs a port of its own", param_hint="ports")
    busy = [
        (option, port)
        for option, port in binds
        if port and accepts(_client_host(host), port, timeout=1.0)
    ]
    if busy:
        # Every busy port at once: fixing them one run at a time is a guessing game.
        named = ", ".join(f"{port} ({option})" for option, port in busy)
        fail(
            EXIT_CONFIG,
            f"{'port' if len(busy) == 1 else 'ports'} {named} on {host} in use "
            "(another `mqchat up` still running?): stop it, or choose others with those options",
        )
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    logs = data_dir.resolve() / "logs"
    url = url_for(database_url, data_dir)
    migrated, has_users = migrate_for_up(url)
    header = [migrated]

    # Imported here: `mqchat send` need not load the daemons' packages (FastAPI...).
    from bridge.config import BridgeSettings
    from broker.config import BrokerSettings
    from history_api.config import ApiSettings
    from push.config import PushSettings

    near = _client_host(host)
    # Free ones by default: two `mqchat up` on one machine (two data dirs) must not
    # collide on a port nobody asked for; status finds them in the data dir.
    bridge_metrics = metrics_port or free_port(near)
    broker_metrics = metrics_port + 1 if metrics_port else free_port(near)
    endpoints = {
        "bridge": f"http://{near}:{bridge_metrics}",
        "api": f"http://{near}:{api_port}",
    }
    if external is None:
        password = _bridge_password(data_dir)
        # Signs the API's MQTT credentials and checks them at the broker.
        credential_secret = _secret(data_dir, "mqtt_credential_secret")
        broker_settings = _settings(
            BrokerSettings,
            "broker",
            database_url=url,
            host=host,
            port=mqtt_port,
            ws_port=ws_port,
            bridge_username=BRIDGE_USERNAME,
            bridge_password=password,
            mqtt_credential_secret=credential_secret,
            metrics_addr=f"{host}:{broker_metrics}",
        )
        endpoints["broker"] = f"http://{near}:{broker_metrics}"
        ws = f"  ws://{near}:{ws_port}/mqtt" if ws_port else ""
        broker = _child(
            broker_settings,
            "broker",
            "broker",
            logs,
            # Its own word that every listener is up, not a probe: a bare TCP connection
            # to the WebSocket port made the websockets library log an ERROR with a
            # traceback ("opening handshake failed") at every start.
            ready_line=BROKER_READY_LOG,
            describe=lambda pid: f"{'broker':<7} mqtt://{near}:{mqtt_port}{ws}  (pid {pid})",
        )
        bridge_link: dict[str, Any] = {
            "mqtt_host": near,
            "mqtt_port": mqtt_port,
            "username": BRIDGE_USERNAME,
            "password": password,
        }
        # The embedded broker keeps no accounts of its own: the API must not try
        # mosquitto's, whatever the environment says.
        api_mosquitto: dict[str, Any] = {
            "mosquitto_admin_password": None,
            "mqtt_credential_secret": credential_secret,
        }
        hint = "" if data_dir == DEFAULT_DATA_DIR else f" --data-dir {data_dir}"
    else:
        bridge_link = {
            "mqtt_host": external[0],
            "mqtt_port": external[1],
            "password": mosquitto_bridge_password,
        }
        api_mosquitto = {
            "mosquitto_host": external[0],
            "mosquitto_port": external[1],
            "mosquitto_admin_username": mosquitto_admin_user,
            "mosquitto_admin_password": mosquitto_admin_password,
        }
        header.insert(
            0, f"{'broker':<7} mqtt://{external[0]}:{external[1]}  (mosquitto, not started here)"
        )
        hint = (
            f" --mosquitto-host {external[0]} --mosquitto-port {external[1]}"
            " --mosquitto-admin-password ..."
        )
    bridge_settings = _settings(
        BridgeSettings,
        "bridge",
        database_url=url,
        metrics_addr=f"{host}:{bridge_metrics}",
        **bridge_link,
    )
    # The web app, where `make web` built it in this checkout (clients/js/dist/site).
    web_dir = Path(__file__).resolve().parents[2] / "clients" / "js" / "dist" / "site"
    web: dict[str, Any] = {}
    if (web_dir / "index.html").is_file():
        web["web_dir"] = web_dir
        if external is None and ws_port:
            web["web_mqtt_url"] = f"ws://{{host}}:{ws_port}/mqtt"
    api_settings = _settings(
        ApiSettings,
        "history_api",
        database_url=url,
        host=host,
        port=api_port,
        **api_mosquitto,
        **web,
    )
    push_settings = _settings(
        PushSettings,
        "push",
        database_url=url,
        vapid_key_file=data_dir.resolve() / VAPID_KEY_FILE,
    )
    push = _child(push_settings, "push", "push", logs, ready_line=PUSH_READY_LOG)
    bridge = _child(
        bridge_settings,
        "bridge",
        "bridge",
        logs,
        # What `python -m bridge` logs once it is subscribed.
        ready_line=BRIDGE_READY_LOG,
        describe=lambda pid: f"{'bridge':<7} {endpoints['bridge']}/metrics  (pid {pid})",
    )
    api = _child(
        api_settings,
        "api",
        "history_api",
        logs,
        ports=[(near, api_port)],
        describe=lambda pid: f"{'api':<7} http://{near}:{api_port}/docs  (pid {pid})",
    )

    stages = [[broker], [bridge, api, push]] if external is None else [[bridge, api, push]]
    if database_url:
        hint = f" --database-url {shown(url)}{hint if external else ''}"
    next_step = f"create a user: mqchat user add alice{hint}"
    if has_users:
        # A restart: the accounts are there, what comes next is chatting.
        chat_port = external[1] if external else mqtt_port
        port = "" if chat_port == DEFAULT_MQTT_PORT else f" --mqtt-port {chat_port}"
        next_step = (
            f"chat: mqchat listen --user NAME{port}  /  mqchat chat PEER --user NAME{port}"
            "  (more users: mqchat user add NAME)"
        )
    footer = [f"{'logs':<7} {logs}/", next_step]
    if web:
        footer.insert(0, f"{'web':<7} http://{near}:{api_port}/  (chat in the browser)")

    write_endpoints(data_dir, endpoints)
    supervisor = Supervisor(
        stages,
        name="mqchat up",
        startup_timeout=startup_timeout,
        shutdown_timeout=shutdown_timeout,
        header=header,
        footer=footer,
    )

    async def supervise() -> int:
        watching = asyncio.create_task(watch(endpoints))
        try:
            return await supervisor.run()
        finally:
            watching.cancel()

    try:
        code = asyncio.run(supervise())
    finally:
        supervisor.kill_all()
    raise typer.Exit(code)
