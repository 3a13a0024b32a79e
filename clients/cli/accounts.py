"""``mqchat user``: create, change and remove accounts, wherever they live.

An account lives in the database and, on mosquitto, in its dynamic-security list as
well (``core.accounts`` changes both). Where those are is the same six options for
every command: ``AccountStore`` declares them once, and ``takes_account_store`` gives
them to each command as one argument (``options.grouped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import typer
from sqlalchemy import Engine
from sqlmodel import Session

from core.accounts import (
    EmbeddedProvisioner,
    Provisioner,
    change_password,
    register,
    set_disabled,
)
from core.accounts import delete as delete_account
from core.dynsec import DynsecProvisioner, ProvisioningError
from core.mqtt import ConnectRefused, LinkConfig
from protocol import errors
from protocol.errors import ProtocolError
from store import accounts
from store import admin as store_admin

from .database import open_migrated, url_for
from .options import (
    DEFAULT_DATA_DIR,
    DatabaseUrlOption,
    DataDirOption,
    MosquittoAdminPasswordOption,
    MosquittoAdminUserOption,
    MosquittoHostOption,
    MosquittoPortOption,
    grouped,
)
from .output import EXIT_NOPERM, EXIT_UNAVAILABLE, emit, fail, refused

app = typer.Typer(help="Manage accounts.", no_args_is_help=True)

#: A change to one account, given the database and whoever keeps the broker's copy.
Change = Callable[[Engine, Provisioner], Awaitable[None]]


@dataclass(frozen=True)
class AccountStore:
    """Where accounts live: the database, and mosquitto when it keeps its own list.

    Each field is an option of every ``mqchat user`` command, declared here once.
    """

    database_url: DatabaseUrlOption = None
    data_dir: DataDirOption = DEFAULT_DATA_DIR
    mosquitto_host: MosquittoHostOption = "127.0.0.1"
    mosquitto_port: MosquittoPortOption = 1883
    mosquitto_admin_user: MosquittoAdminUserOption = "mqchat-admin"
    mosquitto_admin_password: MosquittoAdminPasswordOption = None

    def change(self, change: Change) -> None:
        """Make ``change`` in the database and, with an admin password, in mosquitto."""
        engine = open_migrated(url_for(self.database_url, self.data_dir))
        try:
            asyncio.run(_provisioned(engine, self._admin_link(), change))
        finally:
            engine.dispose()

    def _admin_link(self) -> LinkConfig | None:
        if self.mosquitto_admin_password is None:
            return None
        return LinkConfig(
            host=self.mosquitto_host,
            port=self.mosquitto_port,
            username=self.mosquitto_admin_user,
            password=self.mosquitto_admin_password,
            client_id=f"mqchat-cli-{secrets.token_hex(6)}",
            clean_session=True,
            connect_timeout=5.0,
        )


#: The command with ``store: AccountStore`` replaced by AccountStore's options.
takes_account_store = grouped(AccountStore, "store")


async def _provisioned(engine: Engine, admin: LinkConfig | None, change: Change) -> None:
    async with contextlib.AsyncExitStack() as stack:
        provisioner: Provisioner = EmbeddedProvisioner()
        if admin is not None:
            where = f"mosquitto at {admin.host}:{admin.port}"
            try:
                provisioner = await stack.enter_async_context(DynsecProvisioner(admin))
            except ConnectRefused as exc:
                fail(
                    EXIT_NOPERM,
                    f"{where} refused {admin.username!r}: {exc.reason} "
                    "(check --mosquitto-admin-username / --mosquitto-admin-password)",
                )
            except OSError as exc:
                fail(EXIT_UNAVAILABLE, f"cannot reach {where}: {exc}")
        try:
            await change(engine, provisioner)
        except ProtocolError as exc:
            refused(exc.code, exc.detail)
        except ProvisioningError as exc:
            refused(errors.INTERNAL, f"mosquitto refused: {exc}")


def _read_new_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


def _normal_name(name: str) -> str:
    try:
        return accounts.normalize_username(name)
    except ProtocolError as exc:
        refused(exc.code, exc.detail)


def _new_password(password_stdin: bool, name: str) -> tuple[str, str]:
    """(the normalised name, a new password for it that passes the checks)."""
    password = _read_new_password(password_stdin)
    name = _normal_name(name)
    try:
        accounts.check_password(password, username=name)
    except ProtocolError as exc:
        refused(exc.code, exc.detail)
    return name, password


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


@app.command("add")
@takes_account_store
def add(
    name: Annotated[str, typer.Argument(help="The new username.", show_default=False)],
    password_stdin: PasswordStdinOption = False,
    *,
    store: AccountStore,
) -> None:
    """Create an account that can connect at once: prints `created NAME`.

    The name is normalised (NFKC, lower case): `created` shows the name to sign in
    with. Exits 1 with `error <code>: <detail>` (invalid_username, weak_password,
    username_taken, or internal_error when mosquitto refuses).
    """
    name, password = _new_password(password_stdin, name)
    store.change(lambda engine, provisioner: register(engine, provisioner, name, password))
    emit(f"created {name}")


@app.command("passwd")
@takes_account_store
def passwd(
    name: UsernameArgument,
    password_stdin: PasswordStdinOption = False,
    *,
    store: AccountStore,
) -> None:
    """Set a new password (operators; users change theirs over the HTTP API).

    Prints `password changed NAME`. The old password stops working on the broker at
    once, the account's live connections are dropped and all its bearer tokens
    revoked. Exits 1 with `error <code>: <detail>` (unknown_user, weak_password).
    """
    name, password = _new_password(password_stdin, name)
    store.change(lambda engine, provisioner: change_password(engine, provisioner, name, password))
    emit(f"password changed {name}")


@app.command("disable")
@takes_account_store
def disable(name: UsernameArgument, *, store: AccountStore) -> None:
    """Refuse the account from now on: prints `disabled NAME`.

    Its live connections are dropped and its subscriptions end (at once on mosquitto,
    within MQCHAT_BROKER_ACCOUNT_POLL seconds on the embedded broker); its bearer
    tokens are revoked. `mqchat user enable` undoes it. Exits 1 with
    `error unknown_user: ...`.
    """
    name = _normal_name(name)
    store.change(lambda engine, provisioner: set_disabled(engine, provisioner, name, disabled=True))
    emit(f"disabled {name}")


@app.command("enable")
@takes_account_store
def enable(name: UsernameArgument, *, store: AccountStore) -> None:
    """Let a disabled account connect again: prints `enabled NAME`.

    Its old bearer tokens stay revoked; it signs in anew. Exits 1 with
    `error unknown_user: ...` (also for a deleted account).
    """
    name = _normal_name(name)
    store.change(
        lambda engine, provisioner: set_disabled(engine, provisioner, name, disabled=False)
    )
    emit(f"enabled {name}")


@app.command("delete")
@takes_account_store
def delete(
    name: UsernameArgument,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    *,
    store: AccountStore,
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
    store.change(lambda engine, provisioner: delete_account(engine, provisioner, name))
    emit(f"deleted {name}")


@app.command("admin")
@takes_account_store
def admin(
    name: UsernameArgument,
    revoke: Annotated[bool, typer.Option("--revoke", help="Take the role back.")] = False,
    *,
    store: AccountStore,
) -> None:
    """Grant the admin role (the history API's /v1/admin routes): prints `admin NAME`.

    Only here, by someone with the database in hand: no API route grants it, so no
    account can promote itself. `--revoke` takes it back (prints `not admin NAME`).
    Exits 1 with `error unknown_user: ...`.
    """
    name = _normal_name(name)

    async def change(engine: Engine, provisioner: Provisioner) -> None:
        def grant() -> None:
            with Session(engine) as session:
                store_admin.set_admin(session, name, not revoke)
                session.commit()

        await asyncio.to_thread(grant)

    store.change(change)
    emit(f"{'not admin' if revoke else 'admin'} {name}")
