"""Group receipts on both stacks: a sender sees "delivered to k of n, read by k of n".

In a group a member's cursor move is not told to every member (1,023 publishes per
move): the senders of the messages it covers get one aggregate receipt per bridge
batch. A former member's devices may still ack what they had. Typing follows a
removal at once, whichever bridge instance made it.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import pytest

from history_api import ApiSettings
from protocol import topics

from .support.devices import devices
from .support.history import as_user, serve
from .support.stack import Stack, start_two_bridges, unique_names

#: Members reading one message at once in the storm test.
STORM = 40


def counts(receipt: dict[str, Any]) -> tuple[str, int, str, int, int, int]:
    return (
        receipt["status"],
        receipt["seq"],
        receipt["by"],
        receipt["delivered"],
        receipt["read"],
        receipt["members"],
    )


async def test_the_sender_sees_k_of_n_grow_and_nobody_else_hears_of_each_move(
    shared_stack: Stack,
) -> None:
    names = unique_names("alice", "bob", "carol", "dave")
    alice, bob, carol, dave = await devices(shared_stack, *names)
    group = (await alice.op("create", name="team", members=list(names[1:])))["conversation"]
    sent = await alice.send(group, "read me")  # seq 2

    await bob.up("ack", conversation=group, delivered=2, device="phone")
    assert counts(await alice.next("receipt")) == ("delivered", 2, names[1], 1, 0, 3)
    await carol.up("ack", conversation=group, read=2, device="phone")
    assert counts(await alice.next("receipt")) == ("read", 2, names[2], 2, 1, 3)
    own = await carol.next("receipt")  # carol's own devices learn her read cursor
    assert (own["status"], own["by"], own["seq"]) == ("read", names[2], 2)
    assert "members" not in own
    # An ack that moves nothing costs nothing; dave's read reaches alice as the last.
    await carol.up("ack", conversation=group, read=2, device="phone")
    await dave.up("ack", conversation=group, read=2)
    assert counts(await alice.next("receipt")) == ("read", 2, names[3], 3, 2, 3)
    own = await dave.next("receipt")
    assert (own["status"], own["by"]) == ("read", names[3])
    # Nobody heard of another member's move, and alice nothing more.
    for device in (alice, bob, carol, dave):
        assert device.kinds["receipt"].empty(), device.user

    # bob reads past his own message: alice's is tallied, his own is not (nobody else
    # moved past it); the trace has the counts.
    await bob.send(group, "mine")  # seq 3
    await bob.up("ack", conversation=group, read=3, device="phone")
    assert counts(await alice.next("receipt")) == ("read", 2, names[1], 3, 3, 3)
    own = await bob.next("receipt")  # his own read cursor, and no tally of seq 3
    assert (own["status"], own["seq"], "members" in own) == ("read", 3, False)
    async with serve(ApiSettings(database_url=shared_stack.database_url)) as client:
        trace = await (await as_user(client, names[0])).json(f"/v1/messages/{sent['id']}")
        assert (trace["delivered"], trace["read"], trace["members"]) == (3, 3, 3)
        assert [(d["user"], d["device"]) for d in trace["devices"]] == [
            (names[1], "phone"),
            (names[2], "phone"),
            (names[3], "default"),
        ]
    assert alice.kinds["receipt"].empty()


async def test_a_removed_member_acks_what_they_had_and_the_trace_keeps_them(
    shared_stack: Stack,
) -> None:
    names = unique_names("alice", "bob", "carol")
    alice, bob, carol = await devices(shared_stack, *names)
    group = (await alice.op("create", name="team", members=list(names[1:])))["conversation"]
    sent = await alice.send(group, "bob had this")  # seq 2
    await alice.op("remove", conversation=group, members=[names[1]])  # seq 3
    await alice.send(group, "after bob")  # seq 4

    # bob's device catching up acks past his removal: clipped there, no error.
    await bob.up("ack", conversation=group, read=4, device="tablet")
    own = await bob.next("receipt")
    assert (own["status"], own["seq"]) == ("read", 3)
    assert counts(await alice.next("receipt")) == ("read", 2, names[1], 1, 1, 2)
    assert bob.kinds["error"].empty()

    async with serve(ApiSettings(database_url=shared_stack.database_url)) as client:
        trace = await (await as_user(client, names[0])).json(f"/v1/messages/{sent['id']}")
    # bob is no member now but was one at seq 2; carol has acked nothing yet.
    assert [(d["user"], d["device"], d["read_at"] is not None) for d in trace["devices"]] == [
        (names[1], "tablet", True),
        (names[2], None, False),
    ]
    assert (trace["delivered"], trace["read"], trace["members"]) == (1, 1, 2)
    await carol.close()


@pytest.mark.xdist_group("own_stack")
async def test_a_receipt_storm_costs_the_sender_a_few_publishes(stack: Stack) -> None:
    """STORM members read one message at once: the sender gets one aggregate per bridge
    batch, counted by a raw subscriber on the sender's ``down/receipt``."""
    names = ["alice", *(f"m{i:02d}" for i in range(STORM))]
    alice, *members = await devices(stack, *names)
    group = (await alice.op("create", name="storm", members=names[1:]))["conversation"]
    await alice.send(group, "everyone read this")  # seq 2
    for member in members:
        await member.messages(2)

    # The acks queue at the broker while the bridge is down, then come in at once.
    stack.bridge.stop()
    await asyncio.gather(*(m.up("ack", conversation=group, read=2) for m in members))
    aggregates: list[dict[str, Any]] = []
    done = asyncio.Event()

    def on_receipt(message: Any) -> None:
        receipt = json.loads(message.payload)
        aggregates.append(receipt)
        if receipt.get("read") == STORM:
            done.set()

    counter = await stack.raw("alice", on_message=on_receipt)
    await counter.subscribe(topics.down_receipt("alice"), qos=1)
    await asyncio.to_thread(stack.start_bridge)
    await asyncio.wait_for(done.wait(), 30)

    assert all(r["seq"] == 2 and r["members"] == STORM for r in aggregates), aggregates
    # One per batch that held any of the acks: a handful, not STORM.
    assert len(aggregates) <= STORM // 8, [counts(r) for r in aggregates]
    assert [r["read"] for r in aggregates] == sorted(r["read"] for r in aggregates)
    await counter.close()


def partition_of(user: str) -> int:
    return zlib.crc32(user.encode()) % 2


@pytest.mark.xdist_group("cpu_heavy")
async def test_typing_stops_reaching_a_member_removed_through_the_other_bridge(
    stack: Stack,
) -> None:
    # alice acts through one instance, carol types through the other.
    candidates = [f"carol{i}" for i in range(8)]
    typist = next(c for c in candidates if partition_of(c) != partition_of("alice"))
    second = await start_two_bridges(stack)
    try:
        alice, bob, carol = await devices(stack, "alice", "bob", typist)
        group = (await alice.op("create", name="team", members=["bob", typist]))["conversation"]
        await carol.up("typing", conversation=group)
        for device in (alice, bob):  # carol's instance knows bob now
            assert (await device.next("typing"))["from"] == typist
        await alice.op("remove", conversation=group, members=["bob"])
        await carol.messages(2)  # the removal has reached carol: it is committed
        await bob.messages(2)  # created, removed

        await carol.up("typing", conversation=group, typing=False)
        stopped = await alice.next("typing")
        assert (stopped["from"], stopped["typing"]) == (typist, False)
        # Through carol's instance again, after the stop: bob hears this and not the stop.
        await carol.up("msg", id="after", to="bob", body="psst")
        assert (await bob.next("msg"))["id"] == "after"
        assert bob.kinds["typing"].empty()
    finally:
        second.stop()
        stack.bridge.stop()


async def test_one_to_one_receipts_carry_no_counts(shared_stack: Stack) -> None:
    names = unique_names("alice", "bob")
    alice, bob = await devices(shared_stack, *names)
    await alice.up("msg", id="hi", to=names[1], body="hi")
    sent = await alice.next("receipt")
    await bob.up("ack", conversation=sent["conversation"], read=sent["seq"])
    receipts = [await alice.next("receipt") for _ in range(2)]
    assert [(r["status"], r["by"]) for r in receipts] == [
        ("delivered", names[1]),
        ("read", names[1]),
    ]
    assert not any("members" in r for r in receipts)
