"""How the long-running daemons (``python -m broker``, ``python -m bridge``) collect garbage.

Both freeze what exists once they have started (:func:`freeze_what_exists`): the
modules, SQLAlchemy, pydantic live as long as the process, and a full collection then
does not walk them. The embedded broker goes further (:func:`keep_collections_short`).

Python's collector walks every container object it tracks on a full collection. The
embedded broker holds amqtt's sessions (state machines, queues, tasks): with 1,000
connected users a full collection took 240-370 ms, once every 10-20 s at 200 msg/s,
and every connection's messages stood still meanwhile (``docs/benchmarks.md``). So:

* what exists once the process has started, and whatever survives a full collection
  later, is moved out of the collector's reach (``gc.freeze``): the automatic
  collections after it walk only what is newer;
* the young generation is collected after ``YOUNG`` allocations instead of 700, so
  fewer objects that are merely in flight (a message being relayed) get promoted;
* every ``REFREEZE_EVERY`` seconds one full collection over everything, frozen or not,
  frees what has died among the frozen objects (a session that left, say): one pause
  of that size every few minutes instead of several a minute, logged with its length.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

YOUNG = 20_000
REFREEZE_EVERY = 300.0


def freeze_what_exists() -> None:
    """Collect once, then keep every object that survived out of later collections."""
    gc.collect()
    gc.freeze()


def refreeze() -> float:
    """One full collection over everything, then freeze the survivors; seconds taken."""
    started = time.perf_counter()
    gc.unfreeze()
    freeze_what_exists()
    return time.perf_counter() - started


async def keep_collections_short(every: float = REFREEZE_EVERY, check: float = 1.0) -> None:
    """Apply the broker's policy above for the life of the process (run it as a task).

    Not the bridge's: there the young generation of 20,000 raised p99 at 1,000 msg/s
    from 13.0 to 18.0-20.8 ms (its collections walk the messages in flight, each pause
    longer); freezing at start is all it needs.
    """
    refreeze()
    gc.set_threshold(YOUNG, 10, 10)
    last = time.monotonic()
    full = _full_collections()
    while True:
        await asyncio.sleep(check)
        if time.monotonic() - last >= every:
            took = refreeze()
            last = time.monotonic()
            log.info(
                "full garbage collection took %.0f ms; %d objects frozen until the next",
                took * 1000,
                gc.get_freeze_count(),
            )
        elif _full_collections() != full:
            gc.freeze()  # what survived the automatic full collection is long-lived
        full = _full_collections()


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])
