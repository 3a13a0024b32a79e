"""The daemons' ``/metrics`` move by exactly what happened, and ``/readyz`` tells the truth.

Chat through a real stack, scrape with Prometheus's own text parser, and compare with
what the test did. The deltas of one test's own stack are exact; the waits are for the
one thing that happens after a send returns (a device's delivered ack).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import Engine

from core.mqtt import ConnectRefused
from history_api import ApiSettings
from mqchat import MessageRefused
from tests.support.history import add_users, as_user, serve, sign_in
from tests.support.metrics import Scrape, parse, scrape
from tests.support.services import PostgresServer
from tests.support.stack import Stack, password_of

WAIT = 30.0


async def scrape_until(url: str, done: Callable[[Scrape], bool], what: str) -> Scrape:
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
        lambda s: s.value(delivered, kind="direct") - before.value(delivered, kind="direct") >= 1,
        "bob's delivered acks",
    )
    delta = after - before
    assert delta.value("mqchat_bridge_messages_stored_total") == 3
    assert delta.value("mqchat_bridge_refusals_total", code="unknown_recipient") == 1
    assert delta.value("mqchat_bridge_uplinks_total", kind="msg") == 4
    assert delta.value("mqchat_bridge_arrival_to_commit_seconds_count") == 3
    assert delta.value("mqchat_bridge_redeliveries_total") == 0
    # A sample: the newest message each of bob's cursor moves passed, at most each once.
    assert 1 <= delta.value(delivered, kind="direct") <= 3
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


async def test_embedded_broker_counts_connections_refusals_and_relays(embedded: Stack) -> None:
    url = embedded.broker_metrics_url
    await embedded.add_users("alice", "bob")
    before = await scrape(url)
    alice = await embedded.client("alice")
    bob = await embedded.client("bob")
    with pytest.raises(ConnectRefused):
        await embedded.raw("alice", "not her password")
    await alice.send("hi", to="bob", timeout=WAIT)
    assert (await bob.next_message(timeout=WAIT)).body == "hi"
    delta = await scrape(url) - before
    assert delta.value("mqchat_broker_signin_refusals_total", reason="bad_credentials") == 1
    assert delta.value("mqchat_broker_signins_total") == 2
    # The bridge, alice and bob.
    assert (await scrape(url)).value("mqchat_broker_connections") == 3
    # At least: alice's uplink, bob's copy, alice's copy and her sent receipt.
    assert delta.value("mqchat_broker_relayed_messages_total") >= 4
    status, body = await health(f"{url}/readyz")
    assert (status, body["status"]) == (200, "ready")


async def api_scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return parse(response.text)


async def test_api_counts_requests_by_route_sign_ins_and_tokens(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    add_users(engine, "alice", "bob")
    before = await api_scrape(client)
    alice = await as_user(client, "alice")
    await sign_in(client, "bob")
    wrong = await client.post("/v1/tokens", data={"username": "bob", "password": "wrong-pw-1"})
    assert wrong.status_code == 401
    for conversation in ("c_0123456789", "c_9876543210"):
        response = await alice.get(f"/v1/conversations/{conversation}/messages")
        assert response.status_code == 404
    assert (await client.get("/no/such/route")).status_code == 404
    delta = await api_scrape(client) - before

    assert delta.value("mqchat_api_tokens_issued_total") == 2
    assert delta.value("mqchat_api_signin_failures_total") == 1
    requests = "mqchat_api_requests_total"
    assert delta.value(requests, method="POST", route="/v1/tokens", status="200") == 2
    assert delta.value(requests, method="POST", route="/v1/tokens", status="401") == 1
    # Two conversations, one route: the label is the template, never the path.
    route = "/v1/conversations/{conversation_id}/messages"
    assert delta.value(requests, method="GET", route=route, status="404") == 2
    assert delta.value(requests, method="GET", route="unmatched", status="404") == 1
    assert delta.value("mqchat_api_request_seconds_count", method="GET", route=route) == 2


async def test_api_sign_in_throttles_are_counted(database_url: str, engine: Engine) -> None:
    add_users(engine, "alice")
    async with serve(ApiSettings(database_url=database_url, sign_ins_per_user="1/minute")) as api:
        await sign_in(api, "alice")
        refused = await api.post(
            "/v1/tokens", data={"username": "alice", "password": password_of("alice")}
        )
        assert refused.status_code == 429
        scraped = await api_scrape(api)
    assert scraped.value("mqchat_api_signin_throttles_total", reason="sign_ins") == 1
    assert scraped.value("mqchat_api_tokens_issued_total") == 1


async def test_api_readiness_and_liveness(client: httpx.AsyncClient) -> None:
    live = await client.get("/livez")
    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()) == (
        200,
        {"status": "ready", "checks": {"database": "ok"}},
    )


async def test_undelivered_backlog_counts_a_recipient_away(stack: Stack) -> None:
    stack.bridge.stop()
    stack.bridge.reconfigure(backlog_interval=0.2)
    await asyncio.to_thread(stack.start_bridge)
    url = stack.bridge_metrics_url
    await stack.add_users("alice", "bob")
    alice = await stack.client("alice")
    bob = await stack.client("bob")  # his persistent session, then away
    await bob.close()

    def undelivered(scraped: Scrape) -> float:
        return scraped.value("mqchat_undelivered_messages", older_than="0s")

    for i in range(2):
        await alice.send(f"while away {i}", to="bob", timeout=WAIT)
    waiting = await scrape_until(url, lambda s: undelivered(s) == 2, "a backlog of 2")
    assert waiting.value("mqchat_undelivered_messages", older_than="1h") == 0
    bob = await stack.client("bob")
    assert [(await bob.next_message(timeout=WAIT)).body for _ in range(2)] == [
        "while away 0",
        "while away 1",
    ]
    after = await scrape_until(
        url,
        lambda s: undelivered(s) == 0 and s.value("mqchat_online_users") == 2,
        "the backlog delivered, alice and bob online",
    )
    assert after.value("mqchat_online_devices") == 2
