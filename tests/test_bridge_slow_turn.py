"""A database turn slower than ``MQCHAT_BRIDGE_SLOW_TURN`` is logged, and nothing is lost.

Every message of a batch waits for its turn, so an operator needs to see when a turn
took long and how long: a lock held by someone else here, a disk that stalls a commit
on a busy host.
"""

from __future__ import annotations

import asyncio
import re

from sqlalchemy import text

from .support.services import wait_until
from .support.stack import Stack

#: How long the bridge's write is kept waiting on the lock, at least.
HELD = 0.5


async def test_a_slow_turn_is_logged_with_its_duration(production_stack: Stack) -> None:
    stack = production_stack
    stack.bridge.stop()
    stack.bridge.env["MQCHAT_BRIDGE_SLOW_TURN"] = "0.3"
    await asyncio.to_thread(stack.start_bridge)
    alice, bob = await stack.two_who_chatted("a quick one")  # the conversation exists now
    assert "slow database turn" not in stack.bridge.log_text()

    def bridge_waiting_for(seconds: float) -> bool:
        with stack.engine.connect() as probe:
            waited = probe.execute(
                text(
                    "SELECT max(extract(epoch FROM now() - query_start)) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock'"
                )
            ).scalar()
        return waited is not None and float(waited) >= seconds

    with stack.engine.connect() as locker:
        locker.execute(text("LOCK TABLE messages IN EXCLUSIVE MODE"))  # inserts wait
        sending = asyncio.create_task(alice.send("held up", to="bob", timeout=30))
        await asyncio.to_thread(
            wait_until, lambda: bridge_waiting_for(HELD), timeout=20, what="the write to wait"
        )
        locker.rollback()

    await sending
    assert (await bob.next_message(timeout=20)).body == "held up"
    found = re.findall(r"slow database turn: (\d+) messages took (\d+) ms", stack.bridge.log_text())
    assert found, stack.bridge.log_text()[-2000:]
    count, took_ms = found[-1]
    assert int(count) >= 1
    assert int(took_ms) >= HELD * 1000
