"""``mqchat send / listen / chat``: chatting from a terminal, through the SDK.

Each is a ``ChatClient`` of its own device (``cli-send`` uses a throwaway session;
``cli-listen`` and ``cli-chat`` keep theirs), so ``listen`` and ``chat`` of one user
run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import typer

import mqchat
import protocol
from core.mqtt import tls_context
from core.supervisor import unless_set
from mqchat import ChatClient, ChatMessage

from .options import (
    DEFAULT_MQTT_PORT,
    DeviceOption,
    HostOption,
    PasswordOption,
    PortOption,
    TlsCaOption,
    TlsOption,
    UserOption,
    WebsocketsOption,
    grouped,
)
from .output import (
    EXIT_CONFIG,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    answered,
    emit,
    fail,
    say,
)

#: A connection lost again within this many seconds of being made is in a fight over
#: its session with another connection of the same device (see ``_connected``). One
#: round of the fight is the other side's reconnect: milliseconds on an idle machine,
#: over 2 s on a loaded one, where a 2 s window let both fight on for ever.
TAKEOVER_WINDOW: Final = 5.0


def _stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM, so commands end through their cleanup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


@dataclass(frozen=True, kw_only=True)
class _Connection:
    """Where and as whom a command connects: options of every chat command, declared
    here once (each command gives ``device`` a default of its own)."""

    host: HostOption = "127.0.0.1"
    port: PortOption = DEFAULT_MQTT_PORT
    user: UserOption
    password: PasswordOption
    device: DeviceOption
    tls: TlsOption = False
    tls_ca: TlsCaOption = None
    websockets: WebsocketsOption = False

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls or self.tls_ca):
            return None
        try:
            return tls_context(self.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            fail(EXIT_CONFIG, f"cannot use --tls-ca {self.tls_ca}: {exc}")


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
            say("mqchat: reconnected", err=True)
            return
        if stop is not None and time.monotonic() - connected_at < TAKEOVER_WINDOW:
            fought = True
            say(f"mqchat: the session keeps being taken over, giving up: {taken_over}", err=True)
            # At once, before the link's own reconnect takes the session back again.
            client.link.abort()
            stop.set()
            return
        # MQTT 3.1.1 gives no reason for a takeover: the broker just closes the
        # socket. Say both causes at once rather than stall silently.
        say(
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
            fail(
                EXIT_NOPERM,
                f"the broker refused {conn.user!r}: {exc.reason} (check --user and --password)",
            )
        except mqchat.ConnectError as exc:
            cause = exc.__cause__ or exc.detail
            if exc.code == "unreachable":
                fail(
                    EXIT_UNAVAILABLE, f"cannot reach the broker at {conn.host}:{conn.port}: {cause}"
                )
            # Connected, then cut off before the subscription was in place: on mosquitto,
            # typically the other connection of this device taking its session back.
            fail(
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


@grouped(_Connection, "conn", device="cli-send")
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
    *,
    conn: _Connection,
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
    def no_answer(exc: mqchat.SendTimeout) -> str:
        return (
            f"no 'sent' receipt within {timeout:g} s, so it may not be stored; send again "
            f"with --id {exc.id} (the same id is stored at most once)"
        )

    async with _connected(conn, ephemeral=True) as client:
        with answered(no_answer):
            sent = await client.send(
                body, to=to, conversation=conversation, id=message_id, timeout=timeout
            )
    emit(f"sent {sent.conversation} #{sent.seq}")
    return EXIT_OK


def _wire_json(message: ChatMessage) -> str:
    return protocol.encode(message.down()).decode()


def _line(message: ChatMessage) -> str:
    """``<from>: <body>``, or ``* <body>`` for a group event ("* alice added dave")."""
    return f"* {message.body}" if message.event else f"{message.sender}: {message.body}"


def _receipt_line(receipt: protocol.Receipt) -> str:
    where = f"[{receipt.conversation} #{receipt.seq}]"
    if receipt.members is not None:  # a group's aggregate, for one message of yours
        n = receipt.members
        return f"{where} delivered to {receipt.delivered} of {n}, read by {receipt.read} of {n}"
    if receipt.status == "sent":
        return f"{where} sent"
    return f"{where} {receipt.status} by {receipt.by} (up to here)"


async def _print_receipts(client: ChatClient) -> None:
    while True:
        emit(_receipt_line(await client.receipts.get()))


@grouped(_Connection, "conn", device="cli-listen")
def listen(
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="Exit after this many messages.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each message as its protocol JSON object.")
    ] = False,
    receipts: Annotated[
        bool,
        typer.Option(
            "--receipts", help="Print receipts too (a group's: delivered/read by k of n)."
        ),
    ] = False,
    *,
    conn: _Connection,
) -> None:
    """Print incoming messages, one line each, until Ctrl-C.

    Lines read `[<conversation> #<seq>] <from>: <body>`, and `[...] * <what happened>`
    for a group's events ("alice added dave"); messages you sent from other devices
    appear too. Messages queued for this device while it was offline come first.
    With --receipts, receipts print as `[<conversation> #<seq>] read by bob (up to
    here)`, and a group's for your messages as `[...] delivered to 3 of 4, read by 2
    of 4`. `listening as ...` on stderr says the subscription is in place.
    """
    _run(_listen(conn, count, as_json, receipts))


async def _listen(conn: _Connection, count: int | None, as_json: bool, receipts: bool) -> int:
    stop = _stop_on_signals()
    async with _connected(conn, stop=stop) as client:
        typer.echo(f"listening as {conn.user} (device {conn.device}); Ctrl-C to stop", err=True)
        printer = asyncio.create_task(_print_receipts(client)) if receipts else None
        shown = 0
        try:
            while count is None or shown < count:
                message = await unless_set(stop, client.next_message())
                if message is None:
                    break
                if as_json:
                    emit(_wire_json(message))
                else:
                    emit(f"[{message.conversation} #{message.seq}] {_line(message)}")
                shown += 1
        finally:
            if printer is not None:
                printer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await printer
    return EXIT_OK


@dataclass
class _ChatState:
    peer: str
    #: The 1:1 conversation, learnt from the first receipt or the first message from
    #: the peer (the client cannot know its id before).
    conversation: str | None = None
    #: Ids this process sent: their echo is not printed again.
    mine: set[str] = field(default_factory=set)


@grouped(_Connection, "conn", device="cli-chat")
def chat(
    peer: Annotated[str, typer.Argument(help="Who to chat with.", show_default=False)],
    *,
    conn: _Connection,
) -> None:
    """Chat with PEER: every line you type is sent; their messages print as `<from>: <body>`.

    Ends at end of input (Ctrl-D, or the end of a pipe, once every line is stored) or
    Ctrl-C. Messages of other conversations print as `listen` shows them. Give the
    password by --password or MQCHAT_PASSWORD when piping lines in: a prompt would
    read the first line. Exits 1 if any line was refused.
    """
    _run(_chat(conn, peer))


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
            while (line := await unless_set(stop, lines.get())) is not None:
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                message_id = uuid.uuid4().hex
                state.mine.add(message_id)
                try:
                    sent = await unless_set(stop, client.send(text, to=peer, id=message_id))
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
            emit(_line(message))
        else:
            emit(f"[{message.conversation} #{message.seq}] {_line(message)}")
