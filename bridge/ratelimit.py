"""Per-sender message rates as token buckets, one bucket per configured rate.

The setting keeps the ``limits`` notation (``"20/second;600/minute"``); each item
becomes a bucket holding ``amount`` tokens that refills at ``amount / period`` a
second, so a sender may burst up to the amount and then keeps to the rate.

Why not ``limits``' own moving windows: its in-memory storage runs an expiry thread
every 10 ms, which with 1,000 senders used 0.13-0.18 of a core on this 2-core
machine (bench/load.py), for bookkeeping alone. ``token_bucket`` keeps two numbers
per sender and does its arithmetic when asked.
"""

from __future__ import annotations

from limits import parse_many
from token_bucket import MemoryStorage


class MessageRate:
    def __init__(self, spec: str) -> None:
        self._buckets = [
            (item.amount / item.get_expiry(), item.amount, MemoryStorage())
            for item in parse_many(spec)
        ]

    def allow(self, sender: str) -> bool:
        """Take one token from each of ``sender``'s buckets, or none if any is empty.

        A refusal uses up nothing, so a refused burst does not eat the longer window.
        """
        for rate, capacity, storage in self._buckets:
            storage.replenish(sender, rate, capacity)
            if storage.get_token_count(sender) < 1:
                return False
        for _, _, storage in self._buckets:
            storage.consume(sender, 1)
        return True
