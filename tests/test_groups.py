"""Groups end to end, on both stacks, with stock MQTT clients: the contract alone.

Membership changes are ``up/group`` uplinks; their events arrive on ``down/msg`` in
one seq order with the messages around them; a member reads and receives only the
seqs inside their membership. The rules themselves, every refusal on both
databases, are in ``tests/test_groups_store.py``.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlmodel import Session, col, func, select

from history_api import ApiSettings
from store.tables import Message

from .support.devices import Device, devices
from .support.history import as_user, serve
from .support.stack import Stack, unique_names


def stored_events(stack: Stack, conversation: str) -> int:
    with Session(stack.engine) as session:
        return session.exec(
            select(func.count())
            .select_from(Message)
            .where(col(Message.conversation_id) == conversation, col(Message.event).is_not(None))
        ).one()


async def test_every_member_sees_events_and_messages_in_one_seq_order(shared_stack: Stack) -> None:
    names = unique_names("alice", "bob", "carol")
    alice, bob, carol = await devices(shared_stack, *names)

    created = await alice.op("create", name="team", members=list(names[1:]))
    group = created["conversation"]
    assert created["seq"] == 1
    for device in (alice, bob, carol):
        (event,) = await device.messages(1)
        assert (event["event"], event["seq"], event["conversation"]) == ("created", 1, group)
        assert (event["from"], event["name"], event["users"]) == (
            names[0],
            "team",
            sorted(names[1:]),
        )

    n = 5
    await asyncio.gather(
        *(
            device.send(group, f"{device.user} {i}")
            for device in (alice, bob, carol)
            for i in range(n)
        )
    )
    seen = [await device.messages(3 * n) for device in (alice, bob, carol)]
    orders = [[(m["seq"], m["from"], m["body"]) for m in got] for got in seen]
    assert orders[0] == orders[1] == orders[2]
    assert [seq for seq, _, _ in orders[0]] == list(range(2, 2 + 3 * n))


async def test_a_member_added_at_seq_n_gets_n_on_live_and_from_the_history_api(
    shared_stack: Stack,
) -> None:
    names = unique_names("alice", "bob", "dave")
    alice, bob, dave = await devices(shared_stack, *names)
    group = (await alice.op("create", name="team", members=[names[1]]))["conversation"]
    await bob.send(group, "before dave")  # seq 2

    added = await alice.op("add", conversation=group, members=[names[2]])
    assert added["seq"] == 3
    await alice.send(group, "hello dave")  # seq 4

    got = await dave.messages(2)
    assert [(m["seq"], m.get("event")) for m in got] == [(3, "added"), (4, None)]
    assert got[0]["users"] == [names[2]]
    assert dave.kinds["msg"].empty()

    async with serve(ApiSettings(database_url=shared_stack.database_url)) as client:
        as_dave = await as_user(client, names[2])
        page = await as_dave.json(f"/v1/conversations/{group}/messages", after=0)
        assert [m["seq"] for m in page["messages"]] == [3, 4]
        assert page["messages"][0]["event"] == "added"
        assert "event" not in page["messages"][1]
        members = await as_dave.json(f"/v1/conversations/{group}/members")
        assert [(m["username"], m["role"], m["since_seq"]) for m in members] == [
            (names[0], "admin", 1),
            (names[1], "member", 1),
            (names[2], "member", 3),
        ]
        (listed,) = await as_dave.json("/v1/conversations")
        assert (listed["kind"], listed["name"], listed["member"]) == ("group", "team", True)


async def test_a_removed_member_gets_nothing_after_the_removal_even_queued_offline(
    shared_stack: Stack,
) -> None:
    names = unique_names("alice", "bob", "carol")
    alice, bob = await devices(shared_stack, *names[:2])
    await shared_stack.add_users(names[2])
    carol = Device(shared_stack, names[2])
    session_id = f"{names[2]}:tablet"
    await carol.start(client_id=session_id, clean=False)
    group = (await alice.op("create", name="team", members=list(names[1:])))["conversation"]
    await carol.messages(1)  # created
    await carol.close()  # offline, its session kept: the broker queues for it now

    await bob.send(group, "carol had this")  # seq 2
    removed = await alice.op("remove", conversation=group, members=[names[2]])  # seq 3
    await alice.send(group, "carol must not see this")  # seq 4
    await bob.up("msg", id="marker", to=names[2], body="after everything")

    carol = Device(shared_stack, names[2])
    await carol.start(client_id=session_id, clean=False)
    got = await carol.messages(3)
    assert [(m["conversation"], m["seq"]) for m in got[:2]] == [(group, 2), (group, removed["seq"])]
    assert (got[1]["event"], got[1]["users"]) == ("removed", [names[2]])
    assert got[2]["id"] == "marker"  # published after seq 4: nothing of it came before
    await carol.close()

    # Sending or acting in the group is refused, and nothing is stored.
    carol = await Device(shared_stack, names[2]).start()
    await carol.up("msg", id="late", conversation=group, body="let me back")
    assert (await carol.next("error"))["code"] == "unknown_conversation"
    assert await carol.refused("leave", conversation=group) == "unknown_conversation"
    assert stored_events(shared_stack, group) == 2

    async with serve(ApiSettings(database_url=shared_stack.database_url)) as client:
        as_carol = await as_user(client, names[2])
        page = await as_carol.json(f"/v1/conversations/{group}/messages", after=0)
        assert [m["seq"] for m in page["messages"]] == [1, 2, 3]
        (listed,) = [c for c in await as_carol.json("/v1/conversations") if c["id"] == group]
        assert (listed["member"], listed["members"], listed["last_message"]["seq"]) == (
            False,
            [],
            3,
        )
        response = await as_carol.get(f"/v1/conversations/{group}/members")
        assert response.status_code == 404


async def test_leaving_ends_delivery_and_the_last_admin_hands_over(shared_stack: Stack) -> None:
    names = unique_names("alice", "bob", "carol")
    alice, bob, carol = await devices(shared_stack, *names)
    group = (await alice.op("create", name="team", members=list(names[1:])))["conversation"]
    for device in (alice, bob, carol):
        await device.messages(1)

    await alice.op("leave", conversation=group)
    for device in (alice, bob, carol):
        (left,) = await device.messages(1)
        assert (left["event"], left["from"], left["promoted"]) == ("left", names[0], [names[1]])
    await bob.op("rename", conversation=group, name="bob's team")  # bob is admin now
    for device in (bob, carol):
        (renamed,) = await device.messages(1)
        assert (renamed["event"], renamed["name"]) == ("renamed", "bob's team")
    await alice.up("msg", id="marker", to=names[0], body="note to self")
    (note,) = await alice.messages(1)
    assert note["id"] == "marker"  # the rename, published before it, never came


async def test_a_resent_op_is_answered_again_and_stored_once(shared_stack: Stack) -> None:
    names = unique_names("alice", "bob")
    alice, _ = await devices(shared_stack, *names)
    first = await alice.op("create", id="make-team", name="team", members=[names[1]])
    again = await alice.op("create", id="make-team", name="team", members=[names[1]])
    assert (again["conversation"], again["seq"]) == (first["conversation"], 1)
    assert stored_events(shared_stack, first["conversation"]) == 1
    assert await alice.refused("leave", id="make-team", conversation=first["conversation"]) == (
        "id_reused"
    )


async def test_acks_and_typing_work_in_a_group(shared_stack: Stack) -> None:
    names = unique_names("alice", "bob", "carol")
    alice, bob, carol = await devices(shared_stack, *names)
    group = (await alice.op("create", name="team", members=list(names[1:])))["conversation"]
    await alice.send(group, "read me")  # seq 2

    await bob.up("ack", conversation=group, read=2, device="phone")
    # The sender gets one aggregate (read implies delivered); carol hears nothing of
    # it (tests/test_group_receipts.py has the rest).
    got = await alice.next("receipt")
    assert (got["status"], got["by"], got["seq"]) == ("read", names[1], 2)
    assert (got["delivered"], got["read"], got["members"]) == (1, 1, 2)
    own = await bob.next("receipt")  # bob's own devices learn his read cursor
    assert (own["status"], own["by"], own["seq"]) == ("read", names[1], 2)

    await carol.up("typing", conversation=group)
    for device in (alice, bob):
        typing = await device.next("typing")
        assert (typing["from"], typing["conversation"], typing["typing"]) == (names[2], group, True)


async def test_bad_group_ops_get_their_codes(shared_stack: Stack) -> None:
    names = unique_names("alice", "bob", "mallory")
    alice, bob, mallory = await devices(shared_stack, *names)
    group = (await alice.op("create", name="team", members=[names[1]]))["conversation"]

    assert await mallory.refused("add", conversation=group, members=[names[2]]) == (
        "unknown_conversation"
    )
    await mallory.up("msg", id="sneak", conversation=group, body="hi")
    assert (await mallory.next("error"))["code"] == "unknown_conversation"
    assert await bob.refused("add", conversation=group, members=[names[2]]) == "forbidden"
    assert await alice.refused("add", conversation=group, members=["nobody_here"]) == (
        "unknown_user"
    )
    assert await alice.refused("add", conversation=group, members=[names[1]]) == "already_member"
    assert await alice.refused("remove", conversation=group, members=[names[2]]) == "not_member"
    assert await alice.refused("demote", conversation=group, members=[names[0]]) == "last_admin"
    assert await alice.refused("rename", conversation=group, name=" ") == "invalid_name"
    assert await alice.refused("create", name="x" * 101) == "invalid_name"
    assert await alice.refused("add", conversation=group) == "invalid_payload"
    assert stored_events(shared_stack, group) == 1


@pytest.mark.xdist_group("own_stack")
async def test_a_group_is_full_at_the_configured_cap(stack: Stack) -> None:
    stack.bridge.stop()
    stack.bridge.env["MQCHAT_BRIDGE_GROUP_MAX_MEMBERS"] = "3"
    await asyncio.to_thread(stack.start_bridge)
    names = ("alice", "bob", "carol", "dave")
    alice, *_ = await devices(stack, *names)

    assert await alice.refused("create", name="big", members=list(names[1:])) == "group_full"
    group = (await alice.op("create", name="team", members=[names[1]]))["conversation"]
    await alice.op("add", conversation=group, members=[names[2]])
    assert await alice.refused("add", conversation=group, members=[names[3]]) == "group_full"
    await alice.op("remove", conversation=group, members=[names[2]])
    await alice.op("add", conversation=group, members=[names[3]])


async def test_a_refused_id_stays_refused_when_its_resend_comes_late(shared_stack: Stack) -> None:
    """A resend already on its way when the refusal came (the SDK resends until it has
    an answer) must not be stored once the condition changed: the app was told
    "refused". Found by the chaos checker: a message refused while its sender was not
    yet a member was stored when a late resend arrived after the add."""
    names = unique_names("alice", "bob", "dave")
    alice, bob, dave = await devices(shared_stack, *names)
    group = (await alice.op("create", name="team", members=[names[1]]))["conversation"]

    await dave.up("msg", id="early", conversation=group, body="hello?")
    refused = await dave.next("error")
    assert (refused["code"], refused["id"]) == ("unknown_conversation", "early")
    await alice.op("add", conversation=group, members=[names[2]])  # seq 2
    (added,) = await dave.messages(1)
    assert (added["event"], added["seq"]) == ("added", 2)

    await dave.up("msg", id="early", conversation=group, body="hello?")  # the late resend
    again = await dave.next("error")
    assert (again["code"], again["id"]) == ("unknown_conversation", "early")
    # A new message (a new id) from dave is stored right after the add: nothing between.
    sent = await dave.send(group, "hello, now a member")
    assert sent["seq"] == 3
    for device in (alice, bob):
        got = await device.messages(3)
        assert [(m["seq"], m.get("event")) for m in got] == [
            (1, "created"),
            (2, "added"),
            (3, None),
        ]
