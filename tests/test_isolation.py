"""Users are isolated by the broker's ACL on both stacks: the same rules, the same answers."""

from __future__ import annotations

import asyncio
import json

import pytest

from core.mqtt import ConnectRefused, Incoming, SubscribeRefused
from protocol import topics

from .support.stack import Stack, stored, unique_names

#: ``{alice}``: another user's name.
FORBIDDEN_FILTERS = [
    "chat/v1/u/{alice}/down/#",
    "chat/v1/u/{alice}/down/msg",
    "chat/v1/u/{alice}/up/#",
    "chat/v1/u/+/down/#",
    "chat/v1/u/+/up/#",
    "chat/v1/#",
    "#",
    "+/#",
    "$SYS/#",
    # The retired presence topics: contacts hear of each other on their own down/.
    "chat/v1/presence/+",
    "chat/v1/presence/{alice}",
]


@pytest.mark.parametrize("topic_filter", FORBIDDEN_FILTERS)
async def test_bob_cannot_subscribe_outside_his_tree(
    shared_stack: Stack, topic_filter: str
) -> None:
    stack = shared_stack
    alice, bob_name = await stack.new_users("alice", "bob")
    bob = await stack.raw(bob_name)
    with pytest.raises(SubscribeRefused):
        await bob.subscribe(topic_filter.format(alice=alice), qos=1)
    # What he is allowed to do still works on the same connection.
    await bob.subscribe(topics.down_all(bob_name), qos=1)


async def test_bob_cannot_publish_into_alices_uplink(shared_stack: Stack) -> None:
    stack = shared_stack
    alice, bob_name, carol = await stack.new_users("alice", "bob", "carol")
    receipts: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        receipts.put_nowait(json.loads(m.payload))

    bob = await stack.raw(bob_name, on_message=on_message)
    await bob.subscribe(topics.down_receipt(bob_name), qos=1)
    forged = json.dumps({"id": "forged", "to": carol, "body": "I am alice"}).encode()
    await bob.publish(topics.up_msg(alice), forged, qos=1)
    # The broker acknowledges and drops it (MQTT 3.1.1 has no way to say no); a
    # message bob may send, published after it on the same connection, proves it
    # was not just slow.
    marker = json.dumps({"id": "marker", "to": carol, "body": "hi"}).encode()
    await bob.publish(topics.up_msg(bob_name), marker, qos=1)

    receipt = await asyncio.wait_for(receipts.get(), 15)
    assert receipt["id"] == "marker"
    rows = stored(stack, alice, bob_name, carol)
    assert [(m.sender, m.client_id) for m in rows] == [(bob_name, "marker")]


async def test_sender_comes_from_the_topic_not_the_payload(shared_stack: Stack) -> None:
    stack = shared_stack
    alice_name, bob = await stack.new_users("alice", "bob")
    (carol,) = unique_names("carol")  # named in the payload, never signed up
    bob_client = await stack.client(bob)
    alice = await stack.raw(alice_name)
    payload = json.dumps({"id": "m", "to": bob, "body": "hi", "from": carol}).encode()
    await alice.publish(topics.up_msg(alice_name), payload, qos=1)
    got = await bob_client.next_message(timeout=15)
    assert got.sender == alice_name


async def test_anonymous_and_wrong_password_are_refused(shared_stack: Stack) -> None:
    stack = shared_stack
    (alice,) = await stack.new_users("alice")
    with pytest.raises(ConnectRefused):
        await stack.raw(alice, "not-the-password")
    with pytest.raises(ConnectRefused):
        await stack.raw("", "")
    with pytest.raises(ConnectRefused):
        await stack.raw("nobody", "whatever-password")
    # The bridge's service account is not a user password away either.
    with pytest.raises(ConnectRefused):
        await stack.raw("mqchat-bridge", "mqchat-bridge")


async def test_new_account_can_connect_at_once(shared_stack: Stack) -> None:
    stack = shared_stack
    (alice,) = await stack.new_users("alice")
    (dave_name,) = unique_names("dave")  # signed up below, once refused
    with pytest.raises(ConnectRefused):
        await stack.raw(dave_name)
    await stack.add_users(dave_name)
    dave = await stack.client(dave_name)
    sent = await dave.send("first words", to=alice, timeout=15)
    assert sent.seq == 1
