"""The daemons' ``/metrics`` move by exactly what happened, and ``/readyz`` tells the truth.

Chat through a real stack, scrape with Prometheus's own text parser, and compare with
what the test did. The deltas of one test's own stack are exact; the waits are for the
one thing that happens after a send returns (a device's delivered ack).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from mqchat import MessageRefused
from tests.support.metrics import Scrape, scrape
from tests.support.services import PostgresServer
from tests.support.stack import Stack

WAIT = 30.0


async def scrape_until(url: str, done: callable, what: str) -> Scrape:  # type: ignore[valid-type]
    """Scrape until ``done(scrape)``; the one wait here is for acks still on their way."""
    deadline = time.monotonic() + WAIT
    while True:
        now = await scrape(url)
        if done(now):
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_bridge_counts_stored_refused_and_delivered(stack: Stack) -> None:
    url = stack.bridge_metrics_url
    await stack.add_users("alice", "bob")
    # No resends within the test: each message reaches the bridge once.
    alice = await stack.client("alice", resend_after=60)
    bob = await stack.client("bob")
    before = await scrape(url)

    for i in range(3):
        await alice.send(f"m{i}", to="bob", timeout=WAIT)
    with pytest.raises(MessageRefused):
        await alice.send("hi", to="nobody", timeout=WAIT)
    assert [(await bob.next_message(timeout=WAIT)).body for _ in range(3)] == ["m0", "m1", "m2"]

    delivered = "mqchat_commit_to_delivered_seconds_count"
    after = await scrape_until(
        url,
        lambda s: s.value(delivered, kind="direct") - before.value(delivered, kind="direct") >= 3,
        "bob's delivered acks",
    )
    delta = after - before
    assert delta.value("mqchat_bridge_messages_stored_total") == 3
    assert delta.value("mqchat_bridge_refusals_total", code="unknown_recipient") == 1
    assert delta.value("mqchat_bridge_uplinks_total", kind="msg") == 4
    assert delta.value("mqchat_bridge_arrival_to_commit_seconds_count") == 3
    assert delta.value("mqchat_bridge_redeliveries_total") == 0
    # Each message's first delivery to bob, timed once.
    assert delta.value(delivered, kind="direct") == 3
    assert delta.value(delivered, kind="group") == 0
    assert delta.value("mqchat_bridge_uplinks_total", kind="ack") >= 1
    # Every uplink acknowledged after its PUBACKs: at least the four messages.
    assert delta.value("mqchat_bridge_arrival_to_puback_seconds_count") >= 4
    assert after.value("mqchat_bridge_partitions_owned") == 1
    assert after.value("mqchat_bridge_broker_connected") == 1
    assert after.value("mqchat_bridge_queue_depth") == 0
    # The library's process metrics come for free.
    assert after.value("process_resident_memory_bytes") > 0


async def test_bridge_counts_a_resend_as_a_redelivery(stack: Stack) -> None:
    url = stack.bridge_metrics_url
    await stack.add_users("alice", "bob")
    alice = await stack.client("alice", resend_after=60)
    before = await scrape(url)
    first = await alice.send("once", to="bob", id="same-id", timeout=WAIT)
    again = await alice.send("once", to="bob", id="same-id", timeout=WAIT)
    assert first.seq == again.seq
    delta = await scrape(url) - before
    assert delta.value("mqchat_bridge_messages_stored_total") == 1
    assert delta.value("mqchat_bridge_redeliveries_total") == 1


async def health(url: str) -> tuple[int, dict[str, object]]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url)
    return response.status_code, response.json()


async def test_bridge_readiness_follows_the_database(
    production_stack: Stack, postgres: PostgresServer
) -> None:
    url = production_stack.bridge_metrics_url
    assert await health(f"{url}/readyz") == (
        200,
        {"status": "ready", "checks": {"broker": "ok", "database": "ok"}},
    )
    await asyncio.to_thread(postgres.stop)
    try:
        status, body = await health(f"{url}/readyz")
        assert status == 503
        assert body["status"] == "not ready"
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert checks["broker"] == "ok"
        assert checks["database"] != "ok"
        # Alive all along: liveness is the process, not its dependencies.
        assert await health(f"{url}/livez") == (200, {"status": "alive"})
    finally:
        await asyncio.to_thread(postgres.start)
    assert (await health(f"{url}/readyz"))[0] == 200
