"""``mqchat group ...``: create and run groups from a terminal, through the SDK.

Changes (create, add, remove, leave, promote, demote, rename) go over MQTT like
``mqchat send``, each answered once stored; ``members`` and ``list`` read the
history API (``--api-url``). Every change prints ``<event> <conversation> #<seq>``,
``create`` the new conversation id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Final

import typer

import mqchat
from mqchat import ChatClient, HistoryClient, Sent

from .chat import _connected, _Connection, _run
from .options import DEFAULT_API_URL, ApiUrlOption, grouped
from .output import EXIT_OK, EXIT_UNAVAILABLE, answered, emit, fail, refused

app = typer.Typer(
    help="Groups: create, add and remove members, leave, list (`mqchat group --help`).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

#: Seconds each change waits for its answer.
TIMEOUT: Final = 30.0

ConversationArg = Annotated[
    str, typer.Argument(help="The group's conversation id.", show_default=False)
]
UsersArg = Annotated[list[str], typer.Argument(help="Usernames.", show_default=False)]

Change = Callable[[ChatClient], Awaitable[Sent | str]]
#: ``ChatClient.add_members`` and its kind: (conversation, users, timeout=) -> Sent.
MembersOp = Callable[..., Awaitable[Sent]]


def _no_answer(exc: mqchat.SendTimeout) -> str:
    return (
        f"no answer within {TIMEOUT:g} s; run it again "
        "(the same change is harmless: it is refused or stored once)"
    )


def _change(conn: _Connection, what: str, change: Change) -> None:
    async def go() -> int:
        async with _connected(conn, ephemeral=True) as client:
            with answered(_no_answer):
                done = await change(client)
        if isinstance(done, str):
            emit(done)
        else:
            emit(f"{what} {done.conversation} #{done.seq}")
        return EXIT_OK

    _run(go())


@app.command()
@grouped(_Connection, "conn", device="cli-send")
def create(
    name: Annotated[str, typer.Argument(help="The group's name.", show_default=False)],
    member: Annotated[
        list[str] | None, typer.Option("--member", "-m", help="A member besides you; repeat.")
    ] = None,
    *,
    conn: _Connection,
) -> None:
    """Create a group with you as its admin: prints its conversation id."""
    _change(conn, "created", lambda c: c.create_group(name, member or [], timeout=TIMEOUT))


def _on_members(
    name: str, done: str, op: Callable[[ChatClient], MembersOp], help_text: str
) -> None:
    """Register ``group <name> CONVERSATION USER...``: one op on some members."""

    def command(conversation: ConversationArg, users: UsersArg, *, conn: _Connection) -> None:
        _change(conn, done, lambda c: op(c)(conversation, users, timeout=TIMEOUT))

    command.__doc__ = help_text
    app.command(name=name)(grouped(_Connection, "conn", device="cli-send")(command))


_on_members("add", "added", lambda c: c.add_members, "Add users to a group (admins only).")
_on_members(
    "remove",
    "removed",
    lambda c: c.remove_members,
    "Remove members from a group (admins only); they keep what they had.",
)
_on_members("promote", "promoted", lambda c: c.promote, "Make members admins (admins only).")
_on_members(
    "demote",
    "demoted",
    lambda c: c.demote,
    "Make admins plain members (admins only; never the last one).",
)


@app.command()
@grouped(_Connection, "conn", device="cli-send")
def leave(conversation: ConversationArg, *, conn: _Connection) -> None:
    """Leave a group."""
    _change(conn, "left", lambda c: c.leave_group(conversation, timeout=TIMEOUT))


@app.command()
@grouped(_Connection, "conn", device="cli-send")
def rename(
    conversation: ConversationArg,
    name: Annotated[str, typer.Argument(help="The new name.", show_default=False)],
    *,
    conn: _Connection,
) -> None:
    """Rename a group (admins only)."""
    _change(conn, "renamed", lambda c: c.rename_group(conversation, name, timeout=TIMEOUT))


def _ask(conn: _Connection, api_url: str, ask: Callable[[HistoryClient], Awaitable[int]]) -> None:
    async def go() -> int:
        history = HistoryClient(api_url, conn.user, conn.password)
        try:
            return await ask(history)
        except mqchat.HistoryError as exc:
            refused(exc.code, exc.detail)
        except mqchat.ConnectError as exc:
            fail(EXIT_UNAVAILABLE, f"cannot reach the history API at {api_url}: {exc.detail}")
        finally:
            await history.close()

    _run(go())


@app.command()
@grouped(_Connection, "conn", device="cli-send")
def members(
    conversation: ConversationArg, api_url: ApiUrlOption = DEFAULT_API_URL, *, conn: _Connection
) -> None:
    """List a group's members: `<username> <role> since #<seq>`, one a line."""

    async def ask(history: HistoryClient) -> int:
        for member in await history.members(conversation):
            emit(f"{member.username} {member.role} since #{member.since_seq}")
        return EXIT_OK

    _ask(conn, api_url, ask)


@app.command(name="list")
@grouped(_Connection, "conn", device="cli-send")
def list_groups(api_url: ApiUrlOption = DEFAULT_API_URL, *, conn: _Connection) -> None:
    """List your groups: `<conversation> <name> (<n> members)`, and `(left)` for a group
    you are no longer in."""

    async def ask(history: HistoryClient) -> int:
        groups = [c for c in await history.conversations() if c.kind == "group"]
        for group in groups:
            state = f"({len(group.members)} members)" if group.member else "(left)"
            emit(f"{group.id} {group.name} {state}")
        return EXIT_OK

    _ask(conn, api_url, ask)
