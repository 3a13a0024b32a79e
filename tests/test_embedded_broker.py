"""The embedded broker (amqtt) under subscription churn: live deliveries keep flowing.

amqtt 0.12.1 walks its subscription table while awaiting the ACL check of each
subscriber; a client subscribing or leaving at that moment changed the table under
the walk ("dictionary changed size during iteration") and that broadcast reached no
one. Devices come and go all the time, so on a busy broker this lost live messages
(history still had them). ``broker.embedded`` gives amqtt a table that iterates
over a snapshot, and an index so that a broadcast does not walk every filter.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

from amqtt.broker import Broker
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.embedded import _SubscriptionTable
from core.mqtt import Incoming
from protocol import topics

from .support.stack import Stack

MESSAGES = 150


async def test_live_delivery_survives_subscription_churn(embedded: Stack) -> None:
    await embedded.add_users("alice", "bob", "carol")
    received: list[str] = []
    all_in = asyncio.Event()

    def on_bob(m: Incoming) -> None:
        received.append(json.loads(m.payload)["body"])
        if len(received) == MESSAGES:
            all_in.set()

    bob = await embedded.raw("bob", on_message=on_bob)
    await bob.subscribe(topics.down("bob", "msg"), qos=1)
    alice = await embedded.client("alice")

    async def churn(worker: int) -> int:
        rounds = 0
        while not all_in.is_set() and rounds < 400:
            link = await embedded.raw("carol", client_id=f"carol:churn-{worker}-{rounds}")
            await link.subscribe(topics.down_all("carol"), qos=1)
            await link.subscribe(topics.down_presence("carol"), qos=0)
            await link.close()
            rounds += 1
        return rounds

    # carol's password verified once, so her six churners do not queue for the broker's
    # one hashing slot at once (store.signin refuses a sixth with CONNACK 3).
    await (await embedded.raw("carol", client_id="carol:first")).close()
    churners = [asyncio.create_task(churn(w)) for w in range(6)]
    for i in range(MESSAGES):
        await alice.send(f"m{i}", to="bob", timeout=20)
    await asyncio.wait_for(all_in.wait(), 30)
    rounds = await asyncio.gather(*churners)

    assert sum(rounds) > 20, "the churn did not overlap the messages"
    assert received == [f"m{i}" for i in range(MESSAGES)]
    assert embedded.embedded_broker is not None
    assert "changed size during iteration" not in embedded.embedded_broker.log_text()


# -- the subscription index ------------------------------------------------------------

_LEVELS = st.sampled_from(["chat", "v1", "u", "alice", "bob", "down", "msg", "$SYS", ""])
_TOPICS = st.lists(_LEVELS, min_size=1, max_size=6).map("/".join)
_FILTERS = st.lists(
    st.one_of(_LEVELS, st.just("+"), st.just("#"), st.just("a+")), min_size=1, max_size=6
).map("/".join)


@settings(max_examples=300, deadline=None)
@given(
    filters=st.lists(_FILTERS, min_size=1, max_size=12, unique=True),
    removed=st.lists(st.integers(min_value=0, max_value=11), max_size=4),
    topic=_TOPICS,
)
def test_a_broadcast_is_offered_every_filter_amqtt_would_match(
    filters: list[str], removed: list[int], topic: str
) -> None:
    """The index may only narrow what amqtt walks, never drop a match (amqtt's own
    ``_matches`` is the oracle), through additions and removals alike."""
    table = _SubscriptionTable({})
    for topic_filter in filters:
        table[topic_filter] = [(object(), 1)]
    for index in removed:
        if index < len(filters) and filters[index] in table:
            del table[filters[index]]
    oracle = SimpleNamespace(logger=logging.getLogger("oracle"))
    expected = {f for f in table if Broker._matches(oracle, topic, f)}

    table.relaying = topic
    offered = {f for f, _ in table.items()}

    assert expected <= offered
    assert table.relaying is None  # consumed: the next walk without a topic sees all
    assert {f for f, _ in table.items()} == set(table)
