"""A raw TCP connection to a broker, for bytes no MQTT library would send.

Build what to send with :mod:`tests.support.packets`; :meth:`Raw.answer` says what
the broker did next (a packet type, closed, or nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from .packets import connect
from .stack import Stack, password_of


def login(user: str, client_id: str | None = None) -> bytes:
    cid = (client_id or f"{user}:raw-malformed").encode()
    return connect(cid, user.encode(), password_of(user).encode())


@dataclass
class Raw:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def answer(self, timeout: float = 5.0) -> str:
        """What the broker did next: sent a packet (its type), closed, or nothing."""
        try:
            head = await asyncio.wait_for(self.reader.read(1), timeout)
        except TimeoutError:
            return "open"
        except ConnectionError:
            return "closed"
        if not head:
            return "closed"
        names = {2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 9: "SUBACK", 13: "PINGRESP"}
        kind = names.get(head[0] >> 4, f"type {head[0] >> 4}")
        if kind == "CONNACK":
            rest = await asyncio.wait_for(self.reader.readexactly(3), timeout)
            return f"CONNACK {rest[2]}"
        return kind

    async def until_closed(self, timeout: float = 3.0) -> str:
        """Read and drop everything until the broker closes; 'open' if it never does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return "open"
                if not await asyncio.wait_for(self.reader.read(65536), left):
                    return "closed"
        except TimeoutError:
            return "open"
        except ConnectionError:
            return "closed"

    def close(self) -> None:
        self.writer.close()


async def dial(stack: Stack, opened: list[Raw]) -> Raw:
    """A new connection, left open until the test ends unless the broker closes it."""
    reader, writer = await asyncio.open_connection(stack.host, stack.port)
    opened.append(Raw(reader, writer))
    return opened[-1]
