"""Client misbehaviour in the log: one line per kind and interval, never a traceback.

A client decides how often amqtt logs: one that never acknowledges a QoS 1 message
costs a "Timeout waiting for PUBACK" warning and then a "Task failed" ERROR with a
traceback, per message; a connection flood produced 3,458 such tracebacks in a second.
An attacker could fill the disk and bury everything else. So the records of the loggers
that speak about clients (amqtt's, the WebSocket server's, and ``broker.clients`` for
the gate's refusals) pass
:class:`ClientNoiseFilter`:

* a traceback of an exception a client can cause (timeouts, closed connections,
  malformed packets) becomes ``message: ExceptionType: text`` on the same line;
  any other exception keeps its traceback (that is a bug worth seeing);
* per kind (the call site that logged it) one record per interval passes; the next
  one that passes says how many were left out meanwhile.

Records of every other logger pass untouched.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from amqtt.errors import AMQTTError, MQTTError, NoDataError
from websockets.exceptions import InvalidHandshake
from websockets.exceptions import ProtocolError as WebSocketProtocolError

#: The gate's per-connection refusals (a client's doing, as amqtt's warnings are).
CLIENT_LOG: Final = "broker.clients"
#: Loggers whose records are about what clients do.
CLIENT_LOGGERS: Final = ("amqtt", "transitions", "websockets", CLIENT_LOG)

#: Exceptions a client can cause: logged as one line. (websockets' ConnectionClosed
#: and asyncio.IncompleteReadError are an Exception and an EOFError respectively.)
CLIENT_CAUSED: Final[tuple[type[BaseException], ...]] = (
    TimeoutError,
    ConnectionError,
    EOFError,
    asyncio.IncompleteReadError,
    NoDataError,
    MQTTError,
    AMQTTError,
    # A WebSocket upgrade without the "mqtt" subprotocol, or not HTTP at all: the
    # websockets server logged an ERROR with a traceback for each, before the gate
    # (and its connection rate) ever saw the connection.
    InvalidHandshake,
    WebSocketProtocolError,
)


@dataclass
class _Kind:
    last_logged: float
    left_out: int = 0


class ClientNoiseFilter(logging.Filter):
    """Rate-limits and flattens the records of :data:`CLIENT_LOGGERS` (a handler filter).

    Args:
        interval: seconds during which one record per kind passes; 0 lets all pass
            (still without tracebacks).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._kinds: dict[tuple[str, str, int], _Kind] = {}
        self._lock = threading.Lock()  # records may come from worker threads

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(CLIENT_LOGGERS):
            return True
        left_out = self._count(record)
        if left_out is None:
            return False
        _flatten(record)
        if left_out:
            record.msg = f"{record.getMessage()} [and {left_out} more like this not logged]"
            record.args = None
        return True

    def _count(self, record: logging.LogRecord) -> int | None:
        """None to leave the record out; else how many of its kind were left out."""
        key = (record.name, record.pathname, record.lineno)
        now = self._clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                self._kinds[key] = _Kind(now)
                return 0
            if now - kind.last_logged < self.interval:
                kind.left_out += 1
                return None
            left_out = kind.left_out
            kind.last_logged, kind.left_out = now, 0
            return left_out


def _flatten(record: logging.LogRecord) -> None:
    """Put a client-caused exception on the record's own line instead of a traceback."""
    if not record.exc_info or record.exc_info[1] is None:
        return
    exc = record.exc_info[1]
    if not isinstance(exc, CLIENT_CAUSED) and type(exc).__name__ != "ConnectionClosed":
        return
    record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
    record.args = None
    record.exc_info = None
    record.exc_text = None


def install(interval: float) -> ClientNoiseFilter:
    """Put the filter on every handler of the root logger (where every record ends)."""
    noise = ClientNoiseFilter(interval)
    for handler in logging.getLogger().handlers:
        handler.addFilter(noise)
    return noise
