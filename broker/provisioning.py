"""Creating an account everywhere it must exist: the database, and the broker.

The embedded broker reads accounts straight from the database, so it needs nothing
more. mosquitto keeps its own client list (dynamic security), so an account is
also created there, over ``$CONTROL/dynamic-security/v1``, before the database
transaction commits: if the broker refuses, no half-made account is left behind.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from sqlalchemy import Engine
from sqlmodel import Session

from store import accounts


class Provisioner(Protocol):
    async def create_user(self, username: str, password: str) -> None: ...


class EmbeddedProvisioner:
    """For the embedded broker: the account row is all it needs."""

    async def create_user(self, username: str, password: str) -> None:
        return None


async def register(engine: Engine, provisioner: Provisioner, username: str, password: str) -> None:
    """Create an account that can connect as soon as this returns.

    Raises:
        ProtocolError: ``invalid_username``, ``weak_password`` or ``username_taken``.
        ProvisioningError: the broker refused (the database is left unchanged).
    """
    session = Session(engine)
    try:
        await asyncio.to_thread(accounts.create, session, username, password)
        await provisioner.create_user(username, password)
        await asyncio.to_thread(session.commit)
    finally:
        await asyncio.to_thread(session.close)
