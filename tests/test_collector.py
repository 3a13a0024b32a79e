"""The daemons' garbage-collection policy: long-lived objects frozen, dead ones still freed.

These change the test process's collector, so each puts it back as it was.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from core import collector


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.collect()


@pytest.mark.usefixtures("restored_collector")
def test_refreeze_frees_a_frozen_cycle_that_died_and_freezes_the_living() -> None:
    dead, alive = Cycle(), Cycle()
    gone = weakref.ref(dead)
    gc.freeze()
    del dead
    gc.collect()
    assert gone() is not None  # frozen: out of the automatic collections' reach

    collector.refreeze()
    assert gone() is None
    assert gc.get_freeze_count() > 0
    assert gc.is_tracked(alive)
    gc.collect()
    assert alive.me is alive


@pytest.mark.usefixtures("restored_collector")
async def test_the_policy_freezes_at_start_and_after_an_automatic_full_collection() -> None:
    gc.unfreeze()
    task = asyncio.create_task(collector.keep_collections_short(every=3600, check=0.01))
    try:
        await asyncio.sleep(0.05)
        assert gc.get_threshold()[0] == collector.YOUNG
        at_start = gc.get_freeze_count()
        assert at_start > 0

        later = [Cycle() for _ in range(1000)]  # made after the start: not frozen
        gc.collect()  # what an automatic full collection does, counted the same way
        for _ in range(100):
            if gc.get_freeze_count() >= at_start + len(later):
                break
            await asyncio.sleep(0.01)
        assert gc.get_freeze_count() >= at_start + len(later)
    finally:
        task.cancel()
