"""``mqchat``: chat from a terminal, manage accounts, run the whole stack in one command.

::

    mqchat send / listen / chat ──▶ mqchat.ChatClient ──MQTT──▶ broker ──▶ bridge
    mqchat user add|passwd|disable|enable|delete
                    ──▶ core.accounts ──▶ database (+ mosquitto dynsec)
    mqchat db upgrade ──▶ store.migrate
    mqchat up ──▶ supervises child processes, restarting any that dies:
                  python -m broker (amqtt; not with --mosquitto)
                  python -m bridge
                  python -m history_api

Exit codes (named below): 0 done, 1 the server refused (``error <code>: <detail>`` on
stderr), 2 bad usage, 69 broker or database unreachable, 75 no receipt in time,
77 credentials refused, 78 bad configuration, 130 ``up`` forced by a second Ctrl-C.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn, TypeVar

import typer
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

import mqchat
import protocol
from core.accounts import (
    EmbeddedProvisioner,
    Provisioner,
    change_password,
    register,
    set_disabled,
)
from core.accounts import delete as delete_account
from core.daemon import BRIDGE_READY_LOG, BROKER_READY_LOG
from core.dynsec import (
    Credentials,
    DynsecProvisioner,
    ProvisioningError,
    write_dynsec_bootstrap,
)
from core.mqtt import ConnectRefused, LinkConfig, tls_context
from mqchat import ChatClient, ChatMessage
from protocol import errors
from protocol.errors import ProtocolError
from store import accounts, make_engine, migrate
from store.db import alembic_config
from store.tables import Account

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE
EXIT_TEMPFAIL: Final = 75  # EX_TEMPFAIL: try again, it may work
EXIT_NOPERM: Final = 77  # EX_NOPERM
EXIT_CONFIG: Final = 78  # EX_CONFIG
EXIT_FORCED: Final = 130

DEFAULT_DATA_DIR: Final = Path(".mqchat")
DEFAULT_MQTT_PORT: Final = 1883
#: A connection lost again within this many seconds of being made is in a fight over
#: its session with another connection of the same device (see ``_connected``).
TAKEOVER_WINDOW: Final = 2.0
DATABASE_FILE: Final = "mqchat.db"
SECRETS_FILE: Final = "secrets.json"
BRIDGE_USERNAME: Final = "mqchat-bridge"

app = typer.Typer(
    help="mqchat: a WhatsApp-style chat over MQTT. Start with `mqchat up`.",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks must never print local variables: they hold passwords.
    pretty_exceptions_show_locals=False,
    # Markdown: docstring paragraphs are reflowed to the terminal's width.
    rich_markup_mode="markdown",
)
user_app = typer.Typer(help="Manage accounts.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(db_app, name="db")
mosquitto_app = typer.Typer(help="Set up the production broker.", no_args_is_help=True)
app.add_typer(mosquitto_app, name="mosquitto")

_CONNECTION = "Connection"
_MOSQUITTO = "mosquitto (production broker)"

HostOption = Annotated[
    str,
    typer.Option("--host", envvar="MQCHAT_HOST", help="Broker host.", rich_help_panel=_CONNECTION),
]
PortOption = Annotated[
    int,
    typer.Option(
        "--mqtt-port",
        "--port",
        # The same name as `up --mqtt-port`: one setting starts the broker on a port
        # and points every command at it. --port / MQCHAT_PORT are deprecated aliases.
        envvar=["MQCHAT_MQTT_PORT", "MQCHAT_PORT"],
        help="Broker MQTT port (--port is a deprecated alias).",
        rich_help_panel=_CONNECTION,
    ),
]
UserOption = Annotated[
    str,
    typer.Option(
        "--user", envvar="MQCHAT_USER", help="Your username.", rich_help_panel=_CONNECTION
    ),
]
PasswordOption = Annotated[
    str,
    typer.Option(
        "--password",
        envvar="MQCHAT_PASSWORD",
        prompt=True,
        hide_input=True,
        show_default=False,
        help="Your password; asked for (hidden) when not given.",
        rich_help_panel=_CONNECTION,
    ),
]
TlsOption = Annotated[
    bool,
    typer.Option(
        "--tls",
        envvar="MQCHAT_TLS",
        help="Connect over TLS, trusting the system's CAs; --mqtt-port is then a TLS "
        "listener's (8883, or the wss one with --websockets).",
        rich_help_panel=_CONNECTION,
    ),
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        envvar="MQCHAT_TLS_CA",
        dir_okay=False,
        show_default=False,
        help="Connect over TLS, trusting the CA certificate(s) in this PEM file "
        "(a private CA). Implies --tls.",
        rich_help_panel=_CONNECTION,
    ),
]
WebsocketsOption = Annotated[
    bool,
    typer.Option(
        "--websockets",
        envvar="MQCHAT_WEBSOCKETS",
        help="MQTT over WebSocket (path /mqtt); --mqtt-port is then the WebSocket listener's.",
        rich_help_panel=_CONNECTION,
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        envvar="MQCHAT_DEVICE",
        help="Names this device. The broker keeps one session (and offline queue) per "
        "user and device, and a second connection as the same device takes it over. "
        "Each command has its own default (cli-listen, cli-chat), so `listen` and "
        "`chat` run side by side; two of one command at once need a --device each.",
        rich_help_panel=_CONNECTION,
    ),
]
DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="MQCHAT_DATA_DIR",
        file_okay=False,
        help="Where `mqchat up` keeps the SQLite database, secrets and logs.",
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="MQCHAT_DATABASE_URL",
        show_default=False,
        help="sqlite:///PATH or postgresql://... [default: the SQLite file in --data-dir]",
    ),
]
MosquittoHostOption = Annotated[
    str,
    typer.Option("--mosquitto-host", envvar="MQCHAT_MOSQUITTO_HOST", rich_help_panel=_MOSQUITTO),
]
MosquittoPortOption = Annotated[
    int,
    typer.Option("--mosquitto-port", envvar="MQCHAT_MOSQUITTO_PORT", rich_help_panel=_MOSQUITTO),
]
MosquittoAdminUserOption = Annotated[
    str,
    typer.Option(
        "--mosquitto-admin-username",
        "--mosquitto-admin-user",
        # USERNAME as in the API's MQCHAT_API_MOSQUITTO_ADMIN_USERNAME and the bridge's
        # MQCHAT_BRIDGE_USERNAME; the ..._USER spellings are deprecated aliases.
        envvar=["MQCHAT_MOSQUITTO_ADMIN_USERNAME", "MQCHAT_MOSQUITTO_ADMIN_USER"],
        help="mosquitto's dynamic-security admin account (--mosquitto-admin-user is a "
        "deprecated alias).",
        rich_help_panel=_MOSQUITTO,
    ),
]
MosquittoAdminPasswordOption = Annotated[
    str | None,
    typer.Option(
        "--mosquitto-admin-password",
        envvar="MQCHAT_MOSQUITTO_ADMIN_PASSWORD",
        show_default=False,
        help="When given, accounts are also created in mosquitto (which keeps its own).",
        rich_help_panel=_MOSQUITTO,
    ),
]


#: Old environment names still read, each with the name that replaced it.
DEPRECATED_ENV: Final = {
    "MQCHAT_PORT": "MQCHAT_MQTT_PORT",
    "MQCHAT_MOSQUITTO_ADMIN_USER": "MQCHAT_MOSQUITTO_ADMIN_USERNAME",
}


def main() -> None:
    for old, new in DEPRECATED_ENV.items():
        if old in os.environ:
            ignored = f" (ignored: {new} is set)" if new in os.environ else ""
            _say(f"mqchat: {old} is deprecated, use {new}{ignored}", err=True)
    app()


def _fail(code: int, message: str) -> NoReturn:
    typer.echo(f"mqchat: {message}", err=True)
    raise typer.Exit(code)


def _refused(code: str, detail: str) -> NoReturn:
    typer.echo(f"error {code}: {detail}", err=True)
    raise typer.Exit(EXIT_REFUSED)


def _emit(line: str) -> None:
    """Print one line at once (output is often a pipe); a closed pipe ends quietly."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(EXIT_OK) from None


def _say(line: str, *, err: bool = False) -> None:
    """Print a line of ``mqchat up``'s and never raise.

    ``make run | tee log`` and Ctrl-C: the terminal's SIGINT kills ``tee`` too, so
    the "stopping" line meets a closed pipe. Stopping the children must not depend
    on anyone reading, so a stream that cannot be written is pointed at /dev/null
    and the supervisor goes on.
    """
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


_T = TypeVar("_T")


def _stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM, so commands end through their cleanup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _unless_stopped(stop: asyncio.Event, awaitable: Awaitable[_T]) -> _T | None:
    """Await ``awaitable``, or give up on it and return None once ``stop`` is set."""
    work = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    return work.result() if not work.cancelled() else None


# -- chatting -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Connection:
    host: str
    port: int
    user: str
    password: str
    device: str
    tls: bool = False
    tls_ca: Path | None = None
    websockets: bool = False

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls or self.tls_ca):
            return None
        try:
            return tls_context(self.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            _fail(EXIT_CONFIG, f"cannot use --tls-ca {self.tls_ca}: {exc}")


@contextlib.asynccontextmanager
async def _connected(
    conn: _Connection, *, ephemeral: bool = False, stop: asyncio.Event | None = None
) -> AsyncIterator[ChatClient]:
    """A connected client; with ``stop``, one that gives up a session fight.

    Two connections of one device take the session from each other in turn, each
    reconnecting at once: a storm of takeovers (hundreds a second on mosquitto) in
    which neither receives. A connection lost again within ``TAKEOVER_WINDOW`` of
    being made is taken to be in such a fight: this command says so, sets ``stop``
    and exits 69, and the other connection keeps the session.
    """
    # ``send`` must not use the device's persistent session: it would take over the
    # connection of a ``listen`` running as the same device, and the messages queued
    # for that device would go to this short-lived process instead.
    taken_over = f"if another client is connected as {conn.user} with device {conn.device!r}, "
    taken_over += "it took this session over: give each its own --device"
    connected_at = time.monotonic()
    fought = False

    def report(connected: bool, reason: str) -> None:
        nonlocal connected_at, fought
        if connected:
            connected_at = time.monotonic()
            _say("mqchat: reconnected", err=True)
            return
        if stop is not None and time.monotonic() - connected_at < TAKEOVER_WINDOW:
            fought = True
            _say(f"mqchat: the session keeps being taken over, giving up: {taken_over}", err=True)
            # At once, before the link's own reconnect takes the session back again.
            client.link.abort()
            stop.set()
            return
        # MQTT 3.1.1 gives no reason for a takeover: the broker just closes the
        # socket. Say both causes at once rather than stall silently.
        _say(
            f"mqchat: connection to the broker lost ({reason}); reconnecting. {taken_over}",
            err=True,
        )

    client = ChatClient(
        host=conn.host,
        port=conn.port,
        username=conn.user,
        password=conn.password,
        device=conn.device,
        persistent=not ephemeral,
        transport="websockets" if conn.websockets else "tcp",
        tls=conn.tls_context(),
        on_connection=None if ephemeral else report,
    )
    try:
        try:
            await client.connect()
        except mqchat.ConnectRefused as exc:
            _fail(
                EXIT_NOPERM,
                f"the broker refused {conn.user!r}: {exc.reason} (check --user and --password)",
            )
        except mqchat.ConnectError as exc:
            cause = exc.__cause__ or exc.detail
            if exc.code == "unreachable":
                _fail(
                    EXIT_UNAVAILABLE, f"cannot reach the broker at {conn.host}:{conn.port}: {cause}"
                )
            # Connected, then cut off before the subscription was in place: on mosquitto,
            # typically the other connection of this device taking its session back.
            _fail(
                EXIT_UNAVAILABLE,
                f"the broker dropped the connection while subscribing ({cause}); {taken_over}",
            )
        connected_at = time.monotonic()
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    if fought:
        raise typer.Exit(EXIT_UNAVAILABLE)


def _run(coroutine: Coroutine[Any, Any, int]) -> None:
    raise typer.Exit(asyncio.run(coroutine))


@app.command()
def send(
    body: Annotated[str, typer.Argument(help="The text of the message.", show_default=False)],
    to: Annotated[
        str | None, typer.Option("--to", help="A username: the 1:1 chat with them.")
    ] = None,
    conversation: Annotated[
        str | None, typer.Option("--conversation", help="A conversation id you are in.")
    ] = None,
    message_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="The message id [default: random]. Sending again with the "
            "same id stores the message once: safe to retry.",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the 'sent' receipt.")
    ] = 30.0,
    host: HostOption = "127.0.0.1",
    port: PortOption = 1883,
    user: UserOption = ...,  # type: ignore[assignment]
    password: PasswordOption = ...,  # type: ignore[assignment]
    device: DeviceOption = "cli-send",
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    websockets: WebsocketsOption = False,
) -> None:
    """Send one message and wait until it is stored: prints `sent <conversation> #<seq>`.

    Exits 1 with `error <code>: <detail>` when the server refuses it, 75 when no
    receipt came in time (send again with the printed --id), 77 when the broker
    refuses your credentials.
    """
    if (to is None) == (conversation is None):
        raise typer.BadParameter(
            "give exactly one of --to and --conversation", param_hint="'--to' / '--conversation'"
        )
    conn = _Connection(host, port, user, password, device, tls, tls_ca, websockets)
    _run(
        _send(conn, body, to=to, conversation=conversation, message_id=message_id, timeout=timeout)
    )


async def _send(
    conn: _Connection,
    body: str,
    *,
    to: str | None,
    conversation: str | None,
    message_id: str | None,
    timeout: float,
) -> int:
    async with _connected(conn, ephemeral=True) as client:
        try:
            sent = await client.send(
                body, to=to, conversation=conversation, id=message_id, timeout=timeout
            )
        except mqchat.SendTimeout as exc:
            typer.echo(
                f"error {exc.code}: no 'sent' receipt within {timeout:g} s, so it may not be "
                f"stored; send again with --id {exc.id} (the same id is stored at most once)",
                err=True,
            )
            return EXIT_TEMPFAIL
        except mqchat.MessageRefused as exc:
            _refused(exc.code, exc.detail)
    _emit(f"sent {sent.conversation} #{sent.seq}")
    return EXIT_OK


def _wire_json(message: ChatMessage) -> str:
    return protocol.encode(message.down()).decode()


@app.command()
def listen(
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="Exit after this many messages.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each message as its protocol JSON object.")
    ] = False,
    host: HostOption = "127.0.0.1",
    port: PortOption = 1883,
    user: UserOption = ...,  # type: ignore[assignment]
    password: PasswordOption = ...,  # type: ignore[assignment]
    device: DeviceOption = "cli-listen",
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    websockets: WebsocketsOption = False,
) -> None:
    """Print incoming messages, one line each, until Ctrl-C.

    Lines read `[<conversation> #<seq>] <from>: <body>`; messages you sent from other
    devices appear too. Messages queued for this device while it was offline come
    first. `listening as ...` on stderr says the subscription is in place.
    """
    _run(
        _listen(
            _Connection(host, port, user, password, device, tls, tls_ca, websockets), count, as_json
        )
    )


async def _listen(conn: _Connection, count: int | None, as_json: bool) -> int:
    stop = _stop_on_signals()
    async with _connected(conn, stop=stop) as client:
        typer.echo(f"listening as {conn.user} (device {conn.device}); Ctrl-C to stop", err=True)
        shown = 0
        while count is None or shown < count:
            message = await _unless_stopped(stop, client.next_message())
            if message is None:
                break
            if as_json:
                _emit(_wire_json(message))
            else:
                _emit(f"[{message.conversation} #{message.seq}] {message.sender}: {message.body}")
            shown += 1
    return EXIT_OK


@dataclass
class _ChatState:
    peer: str
    #: The 1:1 conversation, learnt from the first receipt or the first message from
    #: the peer (the client cannot know its id before).
    conversation: str | None = None
    #: Ids this process sent: their echo is not printed again.
    mine: set[str] = field(default_factory=set)


@app.command()
def chat(
    peer: Annotated[str, typer.Argument(help="Who to chat with.", show_default=False)],
    host: HostOption = "127.0.0.1",
    port: PortOption = 1883,
    user: UserOption = ...,  # type: ignore[assignment]
    password: PasswordOption = ...,  # type: ignore[assignment]
    device: DeviceOption = "cli-chat",
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    websockets: WebsocketsOption = False,
) -> None:
    """Chat with PEER: every line you type is sent; their messages print as `<from>: <body>`.

    Ends at end of input (Ctrl-D, or the end of a pipe, once every line is stored) or
    Ctrl-C. Messages of other conversations print as `listen` shows them. Give the
    password by --password or MQCHAT_PASSWORD when piping lines in: a prompt would
    read the first line. Exits 1 if any line was refused.
    """
    _run(_chat(_Connection(host, port, user, password, device, tls, tls_ca, websockets), peer))


def _read_lines(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    """Feed stdin to the loop, line by line; None at the end.

    A thread, because it works alike for a terminal, a pipe and a file (the event
    loop cannot watch a regular file). It is a daemon: a read blocked on the
    terminal must not keep the process alive after Ctrl-C.
    """

    def reader() -> None:
        try:
            for line in iter(sys.stdin.readline, ""):
                loop.call_soon_threadsafe(lines.put_nowait, line)
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=reader, name="stdin", daemon=True).start()


async def _chat(conn: _Connection, peer: str) -> int:
    stop = _stop_on_signals()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    state = _ChatState(peer=peer)
    refused = 0
    async with _connected(conn, stop=stop) as client:
        printer = asyncio.create_task(_print_chat(client, state))
        typer.echo(f"chatting with {peer} as {conn.user}; Ctrl-D or Ctrl-C to end", err=True)
        _read_lines(asyncio.get_running_loop(), lines)
        try:
            while (line := await _unless_stopped(stop, lines.get())) is not None:
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                message_id = uuid.uuid4().hex
                state.mine.add(message_id)
                try:
                    sent = await _unless_stopped(stop, client.send(text, to=peer, id=message_id))
                except mqchat.MessageRefused as exc:
                    typer.echo(f"error {exc.code}: {exc.detail}", err=True)
                    refused += 1
                    continue
                if sent is None:
                    break
                state.conversation = state.conversation or sent.conversation
        finally:
            printer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await printer
        if client.pending:
            typer.echo(
                f"mqchat: {len(client.pending)} message(s) not confirmed stored; they may be lost",
                err=True,
            )
            return EXIT_TEMPFAIL
    return EXIT_REFUSED if refused else EXIT_OK


async def _print_chat(client: ChatClient, state: _ChatState) -> None:
    async for message in client.messages():
        if message.sender == client.username and message.id in state.mine:
            continue
        if state.conversation is None and message.sender == state.peer:
            state.conversation = message.conversation
        if message.conversation == state.conversation:
            _emit(f"{message.sender}: {message.body}")
        else:
            _emit(f"[{message.conversation} #{message.seq}] {message.sender}: {message.body}")


# -- accounts and schema --------------------------------------------------------------


def _database_url(database_url: str | None, data_dir: Path) -> str:
    if database_url:
        return database_url
    return f"sqlite:///{data_dir.resolve() / DATABASE_FILE}"


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _revisions(engine: Engine) -> tuple[str | None, str | None]:
    """(the database's revision, the newest this code knows)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head


def _open_migrated(url: str) -> Engine:
    """An engine on a database that exists and is at the head revision, or exit 78/69.

    Refusing here keeps ``user add`` from creating an empty SQLite file (or writing to
    an old schema) when pointed at the wrong place.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "")
        if not path.exists():
            _fail(
                EXIT_CONFIG,
                f"no database at {path}: run `mqchat up` or "
                "`mqchat db upgrade` first (or give --data-dir / --database-url)",
            )
    engine = make_engine(url)
    try:
        current, head = _revisions(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        _fail(EXIT_UNAVAILABLE, f"cannot use the database {_shown(url)}: {exc}")
    if current != head:
        engine.dispose()
        _fail(
            EXIT_CONFIG,
            f"the database {_shown(url)} is at revision {current or '(none)'}, "
            f"this mqchat needs {head}: run `mqchat db upgrade`",
        )
    return engine


def _admin_link(
    host: str, port: int, admin_user: str, admin_password: str | None
) -> LinkConfig | None:
    if admin_password is None:
        return None
    return LinkConfig(
        host=host,
        port=port,
        username=admin_user,
        password=admin_password,
        client_id=f"mqchat-cli-{secrets.token_hex(6)}",
        clean_session=True,
        connect_timeout=5.0,
    )


def _read_new_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


def _normal_name(name: str) -> str:
    try:
        return accounts.normalize_username(name)
    except ProtocolError as exc:
        _refused(exc.code, exc.detail)


PasswordStdinOption = Annotated[
    bool,
    typer.Option(
        "--password-stdin",
        help="Read the password from the first line of stdin instead of asking twice.",
    ),
]
UsernameArgument = Annotated[
    str,
    typer.Argument(
        help="The username (any spelling that normalises to it: `Alice` is `alice`).",
        show_default=False,
    ),
]


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="The new username.", show_default=False)],
    password_stdin: PasswordStdinOption = False,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    mosquitto_host: MosquittoHostOption = "127.0.0.1",
    mosquitto_port: MosquittoPortOption = 1883,
    mosquitto_admin_user: MosquittoAdminUserOption = "mqchat-admin",
    mosquitto_admin_password: MosquittoAdminPasswordOption = None,
) -> None:
    """Create an account that can connect at once: prints `created NAME`.

    The name is normalised (NFKC, lower case): `created` shows the name to sign in
    with. Exits 1 with `error <code>: <detail>` (invalid_username, weak_password,
    username_taken, or internal_error when mosquitto refuses).
    """
    password = _read_new_password(password_stdin)
    name = _normal_name(name)
    try:
        accounts.check_password(password, username=name)
    except ProtocolError as exc:
        _refused(exc.code, exc.detail)
    admin = _admin_link(
        mosquitto_host, mosquitto_port, mosquitto_admin_user, mosquitto_admin_password
    )
    _change_account(
        database_url,
        data_dir,
        admin,
        lambda engine, provisioner: register(engine, provisioner, name, password),
    )
    _emit(f"created {name}")


@user_app.command("passwd")
def user_passwd(
    name: UsernameArgument,
    password_stdin: PasswordStdinOption = False,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    mosquitto_host: MosquittoHostOption = "127.0.0.1",
    mosquitto_port: MosquittoPortOption = 1883,
    mosquitto_admin_user: MosquittoAdminUserOption = "mqchat-admin",
    mosquitto_admin_password: MosquittoAdminPasswordOption = None,
) -> None:
    """Set a new password (operators; users change theirs over the HTTP API).

    Prints `password changed NAME`. The old password stops working on the broker at
    once, the account's live connections are dropped and all its bearer tokens
    revoked. Exits 1 with `error <code>: <detail>` (unknown_user, weak_password).
    """
    password = _read_new_password(password_stdin)
    name = _normal_name(name)
    try:
        accounts.check_password(password, username=name)
    except ProtocolError as exc:
        _refused(exc.code, exc.detail)
    admin = _admin_link(
        mosquitto_host, mosquitto_port, mosquitto_admin_user, mosquitto_admin_password
    )
    _change_account(
        database_url,
        data_dir,
        admin,
        lambda engine, provisioner: change_password(engine, provisioner, name, password),
    )
    _emit(f"password changed {name}")


@user_app.command("disable")
def user_disable(
    name: UsernameArgument,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    mosquitto_host: MosquittoHostOption = "127.0.0.1",
    mosquitto_port: MosquittoPortOption = 1883,
    mosquitto_admin_user: MosquittoAdminUserOption = "mqchat-admin",
    mosquitto_admin_password: MosquittoAdminPasswordOption = None,
) -> None:
    """Refuse the account from now on: prints `disabled NAME`.

    Its live connections are dropped and its subscriptions end (at once on mosquitto,
    within MQCHAT_BROKER_ACCOUNT_POLL seconds on the embedded broker); its bearer
    tokens are revoked. `mqchat user enable` undoes it. Exits 1 with
    `error unknown_user: ...`.
    """
    name = _normal_name(name)
    admin = _admin_link(
        mosquitto_host, mosquitto_port, mosquitto_admin_user, mosquitto_admin_password
    )
    _change_account(
        database_url,
        data_dir,
        admin,
        lambda engine, provisioner: set_disabled(engine, provisioner, name, disabled=True),
    )
    _emit(f"disabled {name}")


@user_app.command("enable")
def user_enable(
    name: UsernameArgument,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    mosquitto_host: MosquittoHostOption = "127.0.0.1",
    mosquitto_port: MosquittoPortOption = 1883,
    mosquitto_admin_user: MosquittoAdminUserOption = "mqchat-admin",
    mosquitto_admin_password: MosquittoAdminPasswordOption = None,
) -> None:
    """Let a disabled account connect again: prints `enabled NAME`.

    Its old bearer tokens stay revoked; it signs in anew. Exits 1 with
    `error unknown_user: ...` (also for a deleted account).
    """
    name = _normal_name(name)
    admin = _admin_link(
        mosquitto_host, mosquitto_port, mosquitto_admin_user, mosquitto_admin_password
    )
    _change_account(
        database_url,
        data_dir,
        admin,
        lambda engine, provisioner: set_disabled(engine, provisioner, name, disabled=False),
    )
    _emit(f"enabled {name}")


@user_app.command("delete")
def user_delete(
    name: UsernameArgument,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    mosquitto_host: MosquittoHostOption = "127.0.0.1",
    mosquitto_port: MosquittoPortOption = 1883,
    mosquitto_admin_user: MosquittoAdminUserOption = "mqchat-admin",
    mosquitto_admin_password: MosquittoAdminPasswordOption = None,
) -> None:
    """Delete the account for good: prints `deleted NAME`.

    As `disable`, and it cannot be enabled again; on mosquitto the client and its
    role are removed. The name stays taken, so no one else can receive what is
    addressed to it; the conversations it was in keep their history. Exits 1 with
    `error unknown_user: ...`.
    """
    name = _normal_name(name)
    if not yes:
        typer.confirm(f"Delete {name} for good?", abort=True)
    admin = _admin_link(
        mosquitto_host, mosquitto_port, mosquitto_admin_user, mosquitto_admin_password
    )
    _change_account(
        database_url,
        data_dir,
        admin,
        lambda engine, provisioner: delete_account(engine, provisioner, name),
    )
    _emit(f"deleted {name}")


def _change_account(
    database_url: str | None,
    data_dir: Path,
    admin: LinkConfig | None,
    change: Callable[[Engine, Provisioner], Awaitable[None]],
) -> None:
    engine = _open_migrated(_database_url(database_url, data_dir))
    try:
        asyncio.run(_provisioned(engine, admin, change))
    finally:
        engine.dispose()


async def _provisioned(
    engine: Engine,
    admin: LinkConfig | None,
    change: Callable[[Engine, Provisioner], Awaitable[None]],
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        provisioner: Provisioner = EmbeddedProvisioner()
        if admin is not None:
            where = f"mosquitto at {admin.host}:{admin.port}"
            try:
                provisioner = await stack.enter_async_context(DynsecProvisioner(admin))
            except ConnectRefused as exc:
                _fail(
                    EXIT_NOPERM,
                    f"{where} refused {admin.username!r}: {exc.reason} "
                    "(check --mosquitto-admin-username / --mosquitto-admin-password)",
                )
            except OSError as exc:
                _fail(EXIT_UNAVAILABLE, f"cannot reach {where}: {exc}")
        try:
            await change(engine, provisioner)
        except ProtocolError as exc:
            _refused(exc.code, exc.detail)
        except ProvisioningError as exc:
            _refused(protocol.errors.INTERNAL, f"mosquitto refused: {exc}")


@mosquitto_app.command("bootstrap")
def mosquitto_bootstrap(
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
    bridge_user: Annotated[
        str, typer.Option("--bridge-user", envvar="MQCHAT_BRIDGE_USERNAME")
    ] = "mqchat-bridge",
    bridge_password: Annotated[
        str | None,
        typer.Option(
            "--bridge-password",
            envvar="MQCHAT_BRIDGE_PASSWORD",
            show_default=False,
            help="Asked for when not given.",
        ),
    ] = None,
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
            _refused(errors.WEAK_PASSWORD, f"the {who} password is too short")
    try:
        write_dynsec_bootstrap(
            out,
            admin=Credentials(admin_user, admin_password),
            bridge=Credentials(bridge_user, bridge_password),
        )
    except FileExistsError:
        _fail(EXIT_CONFIG, f"{out} exists; it holds every account, so it is not overwritten")
    typer.echo(f"wrote {out} (admin {admin_user}, bridge {bridge_user})")
    typer.echo(
        "mosquitto.conf also loads mqchat's client-id plugin: build it with "
        "`make mosquitto-plugin` and install it as docs/operations.md says; its "
        f"plugin_opt_exempt_users must name {admin_user} and {bridge_user}"
    )


@db_app.command("upgrade")
def db_upgrade(
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Bring the schema to the newest revision (creates the SQLite file if needed)."""
    url = _database_url(database_url, data_dir)
    if not database_url:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = make_engine(url)
    try:
        before, head = _revisions(engine)
        if before == head:
            _emit(f"{_shown(url)}: already at {head} (head)")
            return
        migrate(engine)
        after, _ = _revisions(engine)
    except SQLAlchemyError as exc:
        _fail(EXIT_UNAVAILABLE, f"cannot migrate {_shown(url)}: {exc}")
    finally:
        engine.dispose()
    _emit(f"{_shown(url)}: upgraded {before or '(empty)'} -> {after} (head)")


# -- mqchat up ------------------------------------------------------------------------

#: A child that exits more often than this within RESTART_WINDOW is not restarted again.
MAX_RESTARTS: Final = 5
RESTART_WINDOW: Final = 60.0
#: How often readiness is checked while a child starts (it is also woken by its exit).
_POLL: Final = 0.05


class _NotReady(Exception):
    """A child exited, or did not get ready in time, while starting."""

    def __init__(self, child: _Child, reason: str) -> None:
        super().__init__(f"{child.name} {reason}")
        self.child = child


@dataclass
class _Child:
    """One supervised process and what proves it ready."""

    name: str
    module: str
    env: dict[str, str]
    log_path: Path
    #: Stage 0 starts first; a stage starts once the previous one is ready.
    stage: int
    #: (host, port) pairs that must accept connections.
    ports: list[tuple[str, int]]
    #: Text the child logs once ready, for a child without a port (the bridge).
    ready_line: str | None
    #: The "where it listens" line, given the pid.
    describe: Callable[[int], str]
    process: asyncio.subprocess.Process | None = None
    restarts: collections.deque[float] = field(default_factory=collections.deque)
    _log_offset: int = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"--- mqchat up: starting {self.name} at {stamp} ---\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                # Its own session: a Ctrl-C in the terminal reaches only `mqchat up`, which
                # then stops the children in order, once each.
                start_new_session=True,
            )

    async def wait_ready(self, timeout: float) -> bool:
        """True once ready (a value, so that ``_unless_stopped`` can tell it from a stop).

        Raises:
            _NotReady: the child exited, or was not ready within ``timeout``.
        """
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        deadline = time.monotonic() + timeout
        try:
            while not await self._ready():
                if time.monotonic() > deadline:
                    raise _NotReady(self, f"not ready after {timeout:g} s")
                done, _ = await asyncio.wait({exited}, timeout=_POLL)
                if done:
                    raise _NotReady(self, f"{_exit_text(exited.result())} while starting")
        finally:
            exited.cancel()
        return True

    async def _ready(self) -> bool:
        for host, port in self.ports:
            if not await _accepts(host, port):
                return False
        if self.ready_line is not None:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                if self.ready_line.encode() not in log.read():
                    return False
        return True

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


async def _death(child: _Child) -> None:
    assert child.process is not None
    returncode = await child.process.wait()
    raise _NotReady(child, f"{_exit_text(returncode)} while the next services started")


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _Supervisor:
    """Runs the children: ``run()`` → ``startup()`` → ``main_loop()`` → ``shutdown()``.

    Signals only set flags. The first Ctrl-C or SIGTERM stops the children in reverse
    order of start (the bridge finishes its batch while the broker is still up), each
    with SIGTERM and then, after ``shutdown_timeout``, SIGKILL; a second Ctrl-C kills
    them at once.
    """

    def __init__(
        self,
        children: list[_Child],
        *,
        startup_timeout: float,
        shutdown_timeout: float,
        header: list[str],
        footer: list[str],
    ) -> None:
        self.children = children
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.header = header
        self.footer = footer
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal)
        code = EXIT_OK
        try:
            if await self.startup():
                code = await self.main_loop()
            elif not self._stop.is_set():
                code = EXIT_REFUSED
        finally:
            forced = await self.shutdown()
        return EXIT_FORCED if forced else code

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self._stop.set()
        else:
            self._force.set()

    @property
    def _stages(self) -> list[list[_Child]]:
        stages: dict[int, list[_Child]] = collections.defaultdict(list)
        for child in self.children:
            stages[child.stage].append(child)
        return [stages[stage] for stage in sorted(stages)]

    async def startup(self) -> bool:
        for stage in self._stages:
            for child in stage:
                await child.start()
            try:
                ready = await _unless_stopped(self._stop, self._all_ready(stage))
            except _NotReady as exc:
                _say(
                    f"mqchat up: {exc}; last lines of {exc.child.log_path}:\n"
                    f"{exc.child.log_tail()}",
                    err=True,
                )
                return False
            if ready is None:
                return False
        for line in self.header:
            _say(line)
        for child in self.children:
            assert child.process is not None
            _say(child.describe(child.process.pid))
        for line in self.footer:
            _say(line)
        return True

    async def _all_ready(self, stage: list[_Child]) -> bool:
        """Wait for a stage, failing as soon as any child started so far exits."""
        waits = [asyncio.ensure_future(child.wait_ready(self.startup_timeout)) for child in stage]
        earlier = [c for c in self.children if c.process is not None and c not in stage]
        deaths: list[asyncio.Future[Any]] = [asyncio.ensure_future(_death(c)) for c in earlier]
        ready: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*waits))
        try:
            done, _ = await asyncio.wait({ready, *deaths}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the _NotReady that ended the wait
        finally:
            # The first failure is the one to report; the rest need not run on.
            for task in (ready, *waits, *deaths):
                task.cancel()
            await asyncio.gather(ready, *waits, *deaths, return_exceptions=True)
        return True

    async def main_loop(self) -> int:
        while not self._stop.is_set():
            exits = {
                asyncio.ensure_future(child.process.wait()): child
                for child in self.children
                if child.process is not None
            }
            stopped = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait({*exits, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (*exits, stopped):
                task.cancel()
            if self._stop.is_set():
                break
            for task, child in exits.items():
                if task in done and not await self._restart(child, task.result()):
                    return EXIT_REFUSED
        return EXIT_OK

    async def _restart(self, child: _Child, returncode: int) -> bool:
        """Start a child that died again; False once it has died too often."""
        now = time.monotonic()
        while child.restarts and now - child.restarts[0] > RESTART_WINDOW:
            child.restarts.popleft()
        if len(child.restarts) >= MAX_RESTARTS:
            _say(
                f"mqchat up: {child.name} {_exit_text(returncode)}, the "
                f"{MAX_RESTARTS + 1}th time within {RESTART_WINDOW:g} s: stopping "
                f"everything (see {child.log_path})",
                err=True,
            )
            return False
        child.restarts.append(now)
        _say(
            f"{child.name:<7} {_exit_text(returncode)}; restarting "
            f"({len(child.restarts)} of {MAX_RESTARTS} restarts a minute)"
        )
        await child.start()
        try:
            ready = await _unless_stopped(self._stop, child.wait_ready(self.startup_timeout))
        except _NotReady as exc:
            # Still counts: the next turn of the main loop sees the exit (or lets a
            # slow child be).
            _say(f"mqchat up: {exc}", err=True)
            return True
        if ready:
            assert child.process is not None
            _say(child.describe(child.process.pid))
        return True

    async def shutdown(self) -> bool:
        """Stop every child; True if a second signal forced it."""
        alive = [child for child in self.children if child.alive]
        try:
            if alive:
                _say("stopping " + ", ".join(child.name for child in reversed(alive)))
            for stage in reversed(self._stages):
                await self._stop_stage([child for child in stage if child.alive])
        finally:
            # Whatever happened above (even an exception), no child outlives `mqchat up`.
            self.kill_all()
        for child in self.children:
            if child.process is not None:
                await child.process.wait()
        if alive:
            _say("stopped")
        return self._force.is_set()

    def kill_all(self) -> None:
        """SIGKILL every child still running: the last resort, synchronous so that it
        also runs from a ``finally`` whose event loop is being torn down."""
        for child in self.children:
            if child.alive:
                assert child.process is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGKILL)

    async def _stop_stage(self, stage: list[_Child]) -> None:
        if not stage:
            return
        for child in stage:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.terminate()
        pending = {
            asyncio.ensure_future(child.process.wait())
            for child in stage
            if child.process is not None
        }
        forced = asyncio.ensure_future(self._force.wait())
        deadline = time.monotonic() + self.shutdown_timeout
        while pending and not forced.done() and (remaining := deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait(
                {*pending, forced}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            pending -= done
        for task in (*pending, forced):
            task.cancel()
        for child in stage:
            if not child.alive:
                continue
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            await child.process.wait()
            reason = (
                "second interrupt"
                if self._force.is_set()
                else f"did not stop within {self.shutdown_timeout:g} s"
            )
            _say(f"{child.name:<7} {reason}: killed")


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a service bound to ``host``."""
    wildcards = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104
    return wildcards.get(host, host)


def _port_in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _bridge_password(data_dir: Path) -> str:
    """The embedded broker's password for the bridge: made once, then kept.

    Kept so that a restart of ``mqchat up`` (or a single child) finds the broker
    and the bridge agreeing; never in the code, where it would be everyone's.
    """
    path = data_dir / SECRETS_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            return str(json.loads(path.read_text())["bridge_password"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _fail(EXIT_CONFIG, f"cannot read {path} ({exc!r}); delete it to make new secrets")
    password = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"bridge_password": password}) + "\n")
    return password


def _migrate(url: str) -> tuple[str, bool]:
    """Migrate, returning a line that says what was done and whether any account exists
    (which decides what ``up`` suggests next)."""
    engine = make_engine(url)
    try:
        before, head = _revisions(engine)
        if before != head:
            migrate(engine)
        with Session(engine) as session:
            has_users = session.exec(select(Account.username).limit(1)).first() is not None
    except SQLAlchemyError as exc:
        _fail(EXIT_UNAVAILABLE, f"cannot migrate {_shown(url)}: {exc}")
    finally:
        engine.dispose()
    schema = f"schema {head}" if before == head else f"schema {before or '(empty)'} -> {head}"
    return f"{'db':<7} {_shown(url)}  ({schema})", has_users


def _parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="'--mosquitto'")
    return host.strip("[]"), int(port)


def _broker_child(
    env: dict[str, str], logs: Path, url: str, host: str, ports: tuple[int, int], password: str
) -> _Child:
    near = _client_host(host)
    mqtt_port, ws_port = ports
    ws = f"  ws://{near}:{ws_port}/mqtt" if ws_port else ""
    return _Child(
        name="broker",
        module="broker",
        env={
            **env,
            "MQCHAT_BROKER_DATABASE_URL": url,
            "MQCHAT_BROKER_HOST": host,
            "MQCHAT_BROKER_PORT": str(mqtt_port),
            "MQCHAT_BROKER_WS_PORT": str(ws_port),
            "MQCHAT_BROKER_BRIDGE_USERNAME": BRIDGE_USERNAME,
            "MQCHAT_BROKER_BRIDGE_PASSWORD": password,
        },
        log_path=logs / "broker.log",
        stage=0,
        # Its own word that every listener is up, not a probe: a bare TCP connection
        # to the WebSocket port made the websockets library log an ERROR with a
        # traceback ("opening handshake failed") at every start.
        ports=[],
        ready_line=BROKER_READY_LOG,
        describe=lambda pid: f"{'broker':<7} mqtt://{near}:{mqtt_port}{ws}  (pid {pid})",
    )


def _bridge_child(
    env: dict[str, str], logs: Path, url: str, broker: tuple[str, int], password: str
) -> _Child:
    return _Child(
        name="bridge",
        module="bridge",
        env={
            **env,
            "MQCHAT_BRIDGE_DATABASE_URL": url,
            "MQCHAT_BRIDGE_MQTT_HOST": broker[0],
            "MQCHAT_BRIDGE_MQTT_PORT": str(broker[1]),
            "MQCHAT_BRIDGE_PASSWORD": password,
        },
        log_path=logs / "bridge.log",
        stage=1,
        ports=[],
        # What `python -m bridge` logs once it is subscribed; it has no port to probe.
        ready_line=BRIDGE_READY_LOG,
        describe=lambda pid: f"{'bridge':<7} running (pid {pid})",
    )


def _api_child(env: dict[str, str], logs: Path, url: str, host: str, port: int) -> _Child:
    near = _client_host(host)
    return _Child(
        name="api",
        module="history_api",
        env={
            **env,
            "MQCHAT_API_DATABASE_URL": url,
            "MQCHAT_API_HOST": host,
            "MQCHAT_API_PORT": str(port),
        },
        log_path=logs / "api.log",
        stage=1,
        ports=[(near, port)],
        ready_line=None,
        describe=lambda pid: f"{'api':<7} http://{near}:{port}/docs  (pid {pid})",
    )


@app.command()
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
            rich_help_panel=_MOSQUITTO,
        ),
    ] = None,
    mosquitto_bridge_password: Annotated[
        str | None,
        typer.Option(
            "--mosquitto-bridge-password",
            envvar="MQCHAT_BRIDGE_PASSWORD",
            show_default=False,
            help="Password of the bridge's account in mosquitto.",
            rich_help_panel=_MOSQUITTO,
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
) -> None:
    """Run mqchat here, in one command: broker, bridge and HTTP API, until Ctrl-C.

    Needs nothing else: the embedded broker (amqtt) and a SQLite database in
    --data-dir, migrated on start. The bridge's broker password is generated on the
    first start and kept in `<data-dir>/secrets.json` (mode 0600).

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
    ports = [port for _, port in binds if port]
    if len(set(ports)) != len(ports):
        raise typer.BadParameter("each service needs a port of its own", param_hint="ports")
    busy = [
        (option, port) for option, port in binds if port and _port_in_use(_client_host(host), port)
    ]
    if busy:
        # Every busy port at once: fixing them one run at a time is a guessing game.
        named = ", ".join(f"{port} ({option})" for option, port in busy)
        _fail(
            EXIT_CONFIG,
            f"{'port' if len(busy) == 1 else 'ports'} {named} on {host} in use "
            "(another `mqchat up` still running?): stop it, or choose others with those options",
        )
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    logs = data_dir.resolve() / "logs"
    url = _database_url(database_url, data_dir)
    migrated, has_users = _migrate(url)
    header = [migrated]

    # Settings from the caller's environment pass through (MQCHAT_BRIDGE_KEEPALIVE,
    # ...), except those this command decides.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQCHAT_API_MOSQUITTO_")}
    env["PYTHONUNBUFFERED"] = "1"
    api = _api_child(env, logs, url, host, api_port)
    if external is None:
        password = _bridge_password(data_dir)
        broker = _broker_child(env, logs, url, host, (mqtt_port, ws_port), password)
        bridge = _bridge_child(
            {**env, "MQCHAT_BRIDGE_USERNAME": BRIDGE_USERNAME},
            logs,
            url,
            (_client_host(host), mqtt_port),
            password,
        )
        children = [broker, bridge, api]
        hint = "" if data_dir == DEFAULT_DATA_DIR else f" --data-dir {data_dir}"
    else:
        assert mosquitto_bridge_password is not None
        assert mosquitto_admin_password is not None
        bridge = _bridge_child(env, logs, url, external, mosquitto_bridge_password)
        api.env.update(
            {
                "MQCHAT_API_MOSQUITTO_HOST": external[0],
                "MQCHAT_API_MOSQUITTO_PORT": str(external[1]),
                "MQCHAT_API_MOSQUITTO_ADMIN_USERNAME": mosquitto_admin_user,
                "MQCHAT_API_MOSQUITTO_ADMIN_PASSWORD": mosquitto_admin_password,
            }
        )
        children = [bridge, api]
        header.insert(
            0, f"{'broker':<7} mqtt://{external[0]}:{external[1]}  (mosquitto, not started here)"
        )
        hint = (
            f" --mosquitto-host {external[0]} --mosquitto-port {external[1]}"
            " --mosquitto-admin-password ..."
        )
    if database_url:
        hint = f" --database-url {_shown(url)}{hint if external else ''}"
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

    supervisor = _Supervisor(
        children,
        startup_timeout=startup_timeout,
        shutdown_timeout=shutdown_timeout,
        header=header,
        footer=footer,
    )
    try:
        code = asyncio.run(supervisor.run())
    finally:
        supervisor.kill_all()
    raise typer.Exit(code)
