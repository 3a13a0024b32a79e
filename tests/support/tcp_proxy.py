"""A small asyncio TCP proxy for network fault injection, loopback only.

::

    client ──▶ TcpProxy(127.0.0.1:<free port>) ──▶ target (host, port)

* ``cut()``: close every open connection (both sides) and refuse new ones until ``heal()``;
* ``stall(seconds)``: stop forwarding bytes (connections stay open) for ``seconds``,
  or until ``heal()``;
* ``heal()``: end a cut or a stall.

Bounded: at most ``max_connections`` open pairs, ``chunk`` bytes per read, and a
stalled pipe stops reading, so its socket buffers apply back-pressure instead of
memory growing.
"""

from __future__ import annotations

import asyncio
import contextlib

LOOPBACK = "127.0.0.1"


class TcpProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        max_connections: int = 1024,
        chunk: int = 65536,
        connect_timeout: float = 5.0,
    ) -> None:
        if target_host not in (LOOPBACK, "localhost", "::1"):
            raise ValueError("TcpProxy only forwards to loopback")
        self.target = (target_host, target_port)
        self.max_connections = max_connections
        self.chunk = chunk
        self.connect_timeout = connect_timeout
        self.host = LOOPBACK
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cut = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self.accepted = 0
        self.refused = 0
        self.bytes_forwarded = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> TcpProxy:
        # A backlog for every client: the kernel then completes their handshakes even
        # while the event loop is busy (paho connects with a blocking call, so many
        # links reconnecting at once in the proxy's own loop would otherwise starve it).
        self._server = await asyncio.start_server(
            self._accept, LOOPBACK, 0, backlog=self.max_connections
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._flowing.set()
        if self._server is not None:
            self._server.close()
            self._close_all()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- faults ----------------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def is_stalled(self) -> bool:
        return not self._flowing.is_set()

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def cut(self) -> None:
        """Close every connection and refuse new ones until :meth:`heal`."""
        self._cut = True
        self._close_all()

    def stall(self, seconds: float | None = None) -> None:
        """Stop forwarding (without closing) for ``seconds``, or until :meth:`heal`."""
        self._flowing.clear()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if seconds is not None:
            self._stall_timer = asyncio.get_running_loop().call_later(seconds, self._unstall)

    def heal(self) -> None:
        self._cut = False
        self._unstall()

    def _unstall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._flowing.set()

    # -- plumbing --------------------------------------------------------------------

    def _close_all(self) -> None:
        for a, b in list(self._pairs):
            for writer in (a, b):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        self._pairs.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut or len(self._pairs) >= self.max_connections:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), self.connect_timeout
            )
        except (OSError, TimeoutError):
            self.refused += 1
            writer.transport.abort()
            return
        if self._cut:  # cut while connecting
            self.refused += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        a = asyncio.create_task(self._pipe(reader, up_writer, pair))
        b = asyncio.create_task(self._pipe(up_reader, writer, pair))
        for task in (a, b):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(self.chunk)
                if not data:
                    break
                # A stall that began while we were reading holds these bytes back too.
                await self._flowing.wait()
                if pair not in self._pairs:
                    break
                writer.write(data)
                self.bytes_forwarded += len(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._pairs.discard(pair)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.transport.abort()
