"""A publish quota per user at the broker, so that a flood stops where it enters.

Without it every publish a user makes is relayed to the bridge, which decodes it and
answers ``rate_limited``: one user offering 2,100 msg/s held everyone else's messages
for 1.6 s (p50). The bridge's own rates stay (they say *why* to an honest client);
this one is far above them, so no honest client meets it, and it keeps a flood from
reaching the bridge at all::

    up/msg PUBLISH from user U ──▶ U's publish bucket (``rate``/s, holds ``burst``)
        ├─ a token ──▶ relayed as before (the ACL still decides)
        └─ empty ──▶ dropped (a QoS 1 publish is still PUBACKed, as for an ACL
                     refusal), and one token taken from U's patience bucket
                     (the same size and rate)
                        └─ empty: U sent over twice its rate for a while ──▶ disconnect

Only new messages count (``broker.embedded.QUOTA_SUFFIX``): a device that catches up
on a backlog acks every message it gets, hundreds at once, and acks, typing and
presence have the bridge's own cheap per-kind rates. Counting them cut honest devices
off in a loop (each reconnect got the backlog again, and acked it again).

Both buckets belong to the user, not to a connection: reconnecting, or opening
connections under new client ids, does not refill them. The bridge and other service
accounts have no quota. mosquitto's twin of this is in our plugin
(``broker/mosquitto_clientid/clientid_bind.c``, ``plugin_opt_publish_rate`` and
``plugin_opt_publish_burst``), with the same arithmetic.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection
from typing import Any

from token_bucket import MemoryStorage

log = logging.getLogger(__name__)

#: Set on an amqtt connection's handler once it is being ended for a flood.
_CUT_OFF = "mqchat_quota_cut_off"


class Verdict(enum.Enum):
    RELAY = "relay"
    DROP = "drop"
    DISCONNECT = "disconnect"


class PublishQuota:
    """Per-user publish and patience buckets (``token_bucket``'s arithmetic).

    Args:
        rate: publishes a second a user may keep up; 0 turns the quota off.
        burst: publishes a user may send at once, and refusals it may have in a row
            before it is disconnected.
        exempt: service accounts, never counted.
    """

    def __init__(self, rate: float, burst: int, exempt: Collection[str] = ()) -> None:
        self.rate = rate
        self.burst = burst
        self._exempt = frozenset(exempt)
        self._publishes = MemoryStorage()
        self._patience = MemoryStorage()

    def admit(self, username: str) -> Verdict:
        """Count one publish of ``username``."""
        if self.rate <= 0 or username in self._exempt:
            return Verdict.RELAY
        self._publishes.replenish(username, self.rate, self.burst)
        if self._publishes.consume(username, 1):
            return Verdict.RELAY
        self._patience.replenish(username, self.rate, self.burst)
        if self._patience.consume(username, 1):
            return Verdict.DROP
        return Verdict.DISCONNECT


def disconnect(broker: Any, client_id: str, username: str) -> None:
    """End ``client_id``'s connection the way a lost client ends (its will goes out).

    ``broker``: the amqtt broker (its ``sessions`` table: session and handler).
    """
    entry = broker.sessions.get(client_id)
    if entry is None:
        return
    session, handler = entry
    if not session.transitions.is_connected() or getattr(handler, _CUT_OFF, False):
        return  # the publishes it had already sent are still being read: one line
    setattr(handler, _CUT_OFF, True)  # on the connection's handler: a session outlives it
    log.warning("disconnected %r of %r: over its publish quota", client_id, username)
    # Drop the connection under amqtt, as a lost client would: its reader stops at
    # the end of the stream and ends the session through amqtt's own path. (Telling
    # the handler the connection closed while its reader is busy with a flood left
    # that reader cancelling forever inside asyncio.wait_for, and the socket open.)
    # Aborting the TCP transport also discards what the kernel still holds of the
    # flood; a WebSocket connection gets the end of its stream only.
    stream = getattr(handler.writer, "_writer", None)
    transport = getattr(stream, "transport", None)
    if transport is not None:
        transport.abort()
    else:
        handler.reader.feed_eof()
