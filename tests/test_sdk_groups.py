"""Groups through the Python SDK, on both stacks: every op, events in the message
stream, members from the history API, aggregate receipts, refusals as MessageRefused."""

from __future__ import annotations

import asyncio

import pytest

from mqchat import ChatClient, GroupMember, MessageRefused, Receipt

from .support.stack import Stack

WAIT = 30.0


async def next_receipt(client: ChatClient) -> Receipt:
    return await asyncio.wait_for(client.receipts.get(), WAIT)


async def test_a_group_through_the_sdk(stack: Stack) -> None:
    await stack.start_api()
    await stack.add_users("alice", "bob", "carol")
    alice = await stack.client("alice", history=stack.history("alice"))
    bob = await stack.client("bob", history=stack.history("bob"))
    carol = await stack.client("carol")

    group = await alice.create_group("climbing", ["bob"], timeout=WAIT)
    added = await alice.add_members(group, ["carol"], timeout=WAIT)
    sent = await alice.send("saturday?", conversation=group, timeout=WAIT)
    assert sent.seq == added.seq + 1
    await alice.promote(group, ["bob"], timeout=WAIT)
    await bob.rename_group(group, "climbing club", timeout=WAIT)
    await bob.demote(group, ["alice"], timeout=WAIT)

    got = [await bob.next_message(timeout=WAIT) for _ in range(6)]
    assert [m.event for m in got] == [
        "created",
        "added",
        None,
        "promoted",
        "renamed",
        "demoted",
    ]
    assert (got[0].name, got[1].users, got[4].name) == ("climbing", ("carol",), "climbing club")
    assert got[1].down().users == ["carol"]  # as it came on down/msg
    assert got[2].down().event is None
    assert [(m.event, m.seq) for m in [await carol.next_message(timeout=WAIT)]] == [
        ("added", added.seq)
    ]
    assert await alice.members(group) == [
        GroupMember("alice", "member", 1),
        GroupMember("bob", "admin", 1),
        GroupMember("carol", "member", added.seq),
    ]

    # bob's and carol's devices acked "delivered" by themselves; alice sees k of n.
    counts = None
    while counts != (2, 0, 2):
        receipt = await next_receipt(alice)
        if receipt.seq == sent.seq and receipt.members is not None:
            counts = (receipt.delivered, receipt.read, receipt.members)
    await carol.mark_read(group, sent.seq)
    receipt = await next_receipt(alice)
    assert (receipt.status, receipt.by, receipt.read, receipt.members) == ("read", "carol", 1, 2)

    # Refusals: the code, on the op's id.
    with pytest.raises(MessageRefused) as refused:
        await alice.add_members(group, ["dave"], id="op-1", timeout=WAIT)
    assert (refused.value.code, refused.value.id) == ("forbidden", "op-1")
    with pytest.raises(MessageRefused) as refused:
        await bob.rename_group(group, " ", timeout=WAIT)
    assert refused.value.code == "invalid_name"

    await bob.remove_members(group, ["carol"], timeout=WAIT)
    await alice.leave_group(group, timeout=WAIT)
    seen = [await carol.next_message(timeout=WAIT) for _ in range(5)]
    assert [m.event for m in seen] == [None, "promoted", "renamed", "demoted", "removed"]
    with pytest.raises(MessageRefused) as refused:
        await carol.send("let me back", conversation=group, timeout=WAIT)
    assert refused.value.code == "unknown_conversation"
    assert await bob.members(group) == [GroupMember("bob", "admin", 1)]
