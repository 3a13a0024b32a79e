"""Delivered and read receipts as cursors, with two devices on each side, on both stacks."""

from __future__ import annotations

import asyncio
import json

from sqlmodel import Session, select

import protocol
from core.mqtt import Incoming
from mqchat import ChatClient
from protocol import topics
from store.tables import Cursor

from .support.stack import Stack


async def receipt_matching(
    client: ChatClient, status: str, seq: int, by: str, timeout: float = 15
) -> protocol.Receipt:
    """The first receipt with this status that reaches ``seq``; earlier ones are cursors too."""
    async with asyncio.timeout(timeout):
        while True:
            receipt = await client.receipts.get()
            if receipt.status == status and receipt.by == by and receipt.seq >= seq:
                return receipt


def cursors(stack: Stack, user: str) -> dict[str, tuple[int, int]]:
    with Session(stack.engine) as session:
        rows = session.exec(select(Cursor).where(Cursor.username == user)).all()
        return {row.device: (row.delivered_seq, row.read_seq) for row in rows}


async def test_delivered_and_read_with_two_devices_each_side(shared_stack: Stack) -> None:
    stack = shared_stack
    alice_name, bob_name = await stack.new_users("alice", "bob")
    alice_phone = await stack.client(alice_name, "phone")
    alice_laptop = await stack.client(alice_name, "laptop")
    bob_phone = await stack.client(bob_name, "phone")
    bob_tablet = await stack.client(bob_name, "tablet")

    first = await alice_phone.send("one", to=bob_name, timeout=20)
    second = await alice_phone.send("two", to=bob_name, timeout=20)
    conversation = first.conversation

    # Every device of both users gets both messages (alice's laptop included).
    for device in (alice_phone, alice_laptop, bob_phone, bob_tablet):
        got = [await device.next_message(timeout=10) for _ in range(2)]
        assert [m.body for m in got] == ["one", "two"]

    # The SDK acks delivery by itself; alice's devices hear "delivered up to 2 by bob".
    for device in (alice_phone, alice_laptop):
        receipt = await receipt_matching(device, "delivered", second.seq, bob_name)
        assert receipt.conversation == conversation
        assert receipt.seq == second.seq

    await bob_tablet.mark_read(conversation, second.seq)
    for device in (alice_phone, alice_laptop):
        receipt = await receipt_matching(device, "read", second.seq, bob_name)
        assert receipt.seq == 2
    # bob's other device learns it too, so it can clear its unread count.
    receipt = await receipt_matching(bob_phone, "read", second.seq, bob_name)
    assert receipt.seq == 2

    # Each device keeps its own cursor; the tablet read, the phone only received.
    assert cursors(stack, bob_name) == {"phone": (2, 0), "tablet": (2, 2)}


async def test_cursors_only_move_forward(shared_stack: Stack) -> None:
    stack = shared_stack
    alice_name, bob_name = await stack.new_users("alice", "bob")
    alice = await stack.client(alice_name, ack_delivered=False)
    bob = await stack.client(bob_name, "phone", ack_delivered=False)
    for body in ("a", "b", "c"):
        sent = await alice.send(body, to=bob_name, timeout=20)
    conversation = sent.conversation

    await bob.mark_read(conversation, 3)
    assert (await receipt_matching(alice, "read", 3, bob_name)).seq == 3
    # A late, lower ack changes nothing and tells nobody anything.
    await bob.mark_read(conversation, 1)
    await bob.mark_read(conversation, 3)
    # A message and its read, after those: the next read receipt alice gets is for 4.
    await alice.send("d", to=bob_name, timeout=20)
    await bob.mark_read(conversation, 4)
    receipt = await receipt_matching(alice, "read", 1, bob_name)
    assert receipt.seq == 4
    assert cursors(stack, bob_name) == {"phone": (4, 4)}


async def test_stock_client_acks_and_bad_acks(shared_stack: Stack) -> None:
    stack = shared_stack
    alice_name, bob_name, carol_name = await stack.new_users("alice", "bob", "carol")
    alice = await stack.client(alice_name)
    sent = await alice.send("hi", to=bob_name, timeout=20)
    answers: asyncio.Queue[tuple[str, dict[str, object]]] = asyncio.Queue()

    def on_message(m: Incoming) -> None:
        answers.put_nowait((m.topic, json.loads(m.payload)))

    carol = await stack.raw(carol_name, on_message=on_message)
    await carol.subscribe(topics.down_all(carol_name), qos=1)
    ack = topics.up(carol_name, "ack")
    await carol.publish(ack, json.dumps({"conversation": sent.conversation, "read": 1}).encode())
    topic, error = await asyncio.wait_for(answers.get(), 15)
    assert (topic, error["code"]) == (topics.down_error(carol_name), "unknown_conversation")

    bob = await stack.raw(bob_name, on_message=on_message)
    await bob.subscribe(topics.down_all(bob_name), qos=1)
    bob_ack = topics.up(bob_name, "ack")
    await bob.publish(bob_ack, json.dumps({"conversation": sent.conversation, "read": 9}).encode())
    while True:
        topic, payload = await asyncio.wait_for(answers.get(), 15)
        if topic == topics.down_error(bob_name):
            break
    assert payload["code"] == "invalid_payload"

    # Without a device name a stock client gets the "default" cursor.
    await bob.publish(bob_ack, json.dumps({"conversation": sent.conversation, "read": 1}).encode())
    receipt = await receipt_matching(alice, "read", 1, bob_name)
    assert receipt.seq == 1
    assert cursors(stack, bob_name) == {"default": (1, 1)}
