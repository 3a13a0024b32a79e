"""Changing an account everywhere it lives: the database, and the broker.

The embedded broker reads accounts straight from the database: it checks passwords
there, and it notices within ``MQCHAT_BROKER_ACCOUNT_POLL`` seconds that an account
it has connected was disabled, deleted or given a new password, and drops those
connections. So it needs nothing more. mosquitto keeps its own client list (dynamic
security), so every change is also made there, over ``$CONTROL/dynamic-security/v1``,
before the database transaction commits: if the broker refuses, the database is
left as it was. dynsec drops the live connections of a client it disables, deletes
or gives a new password. Revoking the tokens also revokes the account's MQTT
credentials (``core.credentials``): the embedded broker sees the new token generation
in the database; mosquitto's plugin is told it (``revoke_credentials``).

::

    register / change_password / revoke_tokens / disable / enable / delete
        ├─▶ store.accounts (+ store.tokens revoked: a new token generation)
        │                                              flushed, not yet committed
        ├─▶ provisioner (dynsec command, and the generation to mosquitto's plugin;
        │                nothing for the embedded broker)
        └─▶ COMMIT
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from sqlalchemy import Engine
from sqlmodel import Session

from store import accounts, tokens

_T = TypeVar("_T")


class Provisioner(Protocol):
    async def create_user(self, username: str, password: str) -> None: ...
    async def set_password(self, username: str, password: str) -> None: ...
    async def disable_user(self, username: str) -> None: ...
    async def enable_user(self, username: str) -> None: ...
    async def delete_user(self, username: str) -> None: ...
    async def revoke_credentials(self, username: str, generation: int) -> None: ...


class EmbeddedProvisioner:
    """For the embedded broker: the account row is all it needs."""

    async def create_user(self, username: str, password: str) -> None:
        return None

    async def set_password(self, username: str, password: str) -> None:
        return None

    async def disable_user(self, username: str) -> None:
        return None

    async def enable_user(self, username: str) -> None:
        return None

    async def delete_user(self, username: str) -> None:
        return None

    async def revoke_credentials(self, username: str, generation: int) -> None:
        return None


async def _in_transaction(
    engine: Engine, change: Callable[[Session], _T], broker: Callable[[_T], Awaitable[None]]
) -> None:
    """Make ``change`` in the database, then on the broker (given what ``change``
    returned), then commit."""
    session = Session(engine)
    try:
        done = await asyncio.to_thread(change, session)
        await broker(done)
        await asyncio.to_thread(session.commit)
    finally:
        await asyncio.to_thread(session.close)


async def register(engine: Engine, provisioner: Provisioner, username: str, password: str) -> None:
    """Create an account that can connect as soon as this returns.

    Raises:
        ProtocolError: ``invalid_username``, ``weak_password`` or ``username_taken``.
        ProvisioningError: the broker refused (the database is left unchanged).
    """
    await _in_transaction(
        engine,
        lambda session: accounts.create(session, username, password),
        lambda _: provisioner.create_user(username, password),
    )


async def change_password(
    engine: Engine,
    provisioner: Provisioner,
    username: str,
    password: str,
    *,
    keep_token: str | None = None,
) -> None:
    """Set a new password; every bearer token but ``keep_token`` stops working.

    The old password stops working on both brokers when this returns; connections
    made with it are dropped (at once by mosquitto, within the poll interval by the
    embedded broker).

    Raises:
        ProtocolError: ``unknown_user`` or ``weak_password``.
        ProvisioningError: the broker refused (nothing changed).
    """

    def change(session: Session) -> int:
        accounts.set_password(session, username, password)
        return tokens.revoke_all(session, username, keep=keep_token)

    async def broker(generation: int) -> None:
        await provisioner.set_password(username, password)
        await provisioner.revoke_credentials(username, generation)

    await _in_transaction(engine, change, broker)


async def revoke_tokens(engine: Engine, provisioner: Provisioner, username: str) -> int:
    """Revoke every bearer token and MQTT credential of an account (an admin's
    "sign out everywhere"); the password keeps working. Connections made with a
    credential are dropped: at once by mosquitto's plugin (it drops all of the
    user's connections; those made with the password sign in again), within the poll
    interval by the embedded broker.

    Returns:
        How many bearer tokens were revoked.

    Raises:
        ProtocolError: ``unknown_user``.
        ProvisioningError: the broker did not answer (nothing changed).
    """
    revoked = 0

    def change(session: Session) -> int:
        nonlocal revoked
        accounts.existing(session, username)
        revoked = tokens.count_live(session, username)
        return tokens.revoke_all(session, username)

    await _in_transaction(
        engine, change, lambda generation: provisioner.revoke_credentials(username, generation)
    )
    return revoked


async def set_disabled(
    engine: Engine, provisioner: Provisioner, username: str, *, disabled: bool
) -> None:
    """Disable an account (dropping its connections and tokens) or enable it again.

    Raises:
        ProtocolError: ``unknown_user``.
        ProvisioningError: the broker refused (nothing changed).
    """

    def change(session: Session) -> int | None:
        accounts.set_disabled(session, username, disabled)
        return tokens.revoke_all(session, username) if disabled else None

    async def broker(generation: int | None) -> None:
        if generation is None:
            await provisioner.enable_user(username)
            return
        await provisioner.disable_user(username)
        await provisioner.revoke_credentials(username, generation)

    await _in_transaction(engine, change, broker)


async def delete(engine: Engine, provisioner: Provisioner, username: str) -> None:
    """Delete an account: connections dropped, tokens revoked, the name kept taken.

    Raises:
        ProtocolError: ``unknown_user``.
        ProvisioningError: the broker refused (nothing changed).
    """

    def change(session: Session) -> int:
        accounts.delete(session, username)
        return tokens.revoke_all(session, username)

    async def broker(generation: int) -> None:
        await provisioner.delete_user(username)
        await provisioner.revoke_credentials(username, generation)

    await _in_transaction(engine, change, broker)
