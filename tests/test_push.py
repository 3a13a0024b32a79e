"""Push when away, end to end: chat over MQTT, push daemon, a real HTTPS push service.

Every case runs on both stacks (SQLite + amqtt, PostgreSQL + mosquitto). The push
service (``tests/support/push.py``) checks the VAPID signature and claims and
decrypts each payload with the device's own keys. Waiting is on events: a request
reaching the receiver, a row in the database, a daemon's exit; never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func
from sqlmodel import Session, select

from core import daemon
from core.daemon import PUSH_READY_LOG
from core.endpoints import Allowlist, EndpointRefused, vet
from history_api.config import ApiSettings
from mqchat import ChatClient
from protocol import UpPresence, encode, topics
from push.config import PushSettings
from store import push as store_push
from store.tables import Cursor, Device, PushOutbox, PushState, PushSubscription
from store.types import utcnow

from .support.history import sign_in
from .support.push import DeviceKeys, PushReceiver, register
from .support.services import LOOPBACK, Daemon, free_port, wait_until
from .support.stack import Stack

#: A shorter grace than the default (3 s) keeps the suite quick; the margin is what a
#: loaded two-core machine may add between the grace's end and the receipt.
GRACE = 1.5
MARGIN = 2.5
WAIT = 30.0


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[PushReceiver]:
    r = PushReceiver(tmp_path)
    yield r
    r.close()


class PushStack:
    """The shared stack with a history API that allows the loopback receiver, and
    push daemons started per test."""

    def __init__(self, stack: Stack, receiver: PushReceiver, base: Path, api_url: str) -> None:
        self.stack, self.receiver, self.base, self.api_url = stack, receiver, base, api_url
        self.daemons: list[Daemon] = []
        self.vapid_file = base / "vapid.pem"

    def push_daemon(self, name: str = "push", **changes: Any) -> Daemon:
        values: dict[str, Any] = {
            "database_url": self.stack.database_url,
            "vapid_key_file": self.vapid_file,
            "allow_hosts": [LOOPBACK],
            "ca_file": self.receiver.cert_file,
            "grace": GRACE,
            "collapse": 2.0,
            "poll": 0.05,
            "max_retry_after": 5.0,
        }
        settings = daemon.build(PushSettings, **(values | changes))
        child = Daemon(name, "push", {}, self.base, settings=settings, ready_line=PUSH_READY_LOG)
        self.daemons.append(child)
        return child

    def start(self, name: str = "push", **changes: Any) -> Daemon:
        child = self.push_daemon(name, **changes)
        child.start_ready()
        return child

    @contextlib.asynccontextmanager
    async def api(self, user: str) -> AsyncIterator[httpx.AsyncClient]:
        """The history API as ``user``, signed in."""
        async with httpx.AsyncClient(base_url=self.api_url, timeout=10) as client:
            client.headers["Authorization"] = f"Bearer {await sign_in(client, user)}"
            yield client

    async def subscribe(self, user: str, device: str = "phone", *script: Any) -> str:
        """Register a subscription of ``user``'s device at the receiver; its path name."""
        name = f"{user}-{device}"
        async with self.api(user) as api:
            await register(api, self.receiver, device, name, *script)
        return name

    def decided(self, user: str, conversation: str, seq: int) -> bool:
        """Whether the push daemons have decided on ``seq`` (pushed or not)."""
        with Session(self.stack.engine) as session:
            state = session.get(PushState, (user, conversation))
            return state is not None and state.decided_seq >= seq

    def pending(self, user: str, conversation: str) -> int:
        """The newest message scanned and waiting for its decision (0: none)."""
        with Session(self.stack.engine) as session:
            state = session.get(PushState, (user, conversation))
            return state.pending_seq if state is not None else 0

    def read_by(self, user: str, conversation: str) -> int:
        with Session(self.stack.engine) as session:
            return (
                session.exec(
                    select(func.max(Cursor.read_seq)).where(
                        Cursor.conversation_id == conversation, Cursor.username == user
                    )
                ).one()
                or 0
            )

    def end_collapse(self, user: str, conversation: str) -> None:
        """Make a waiting burst due now: the collapse window's end, without waiting
        it out."""
        with Session(self.stack.engine) as session:
            state = session.get(PushState, (user, conversation))
            assert state is not None
            assert state.due_at is not None
            state.due_at = utcnow()
            session.add(state)
            session.commit()

    def outbox(self, user: str) -> list[PushOutbox]:
        with Session(self.stack.engine) as session:
            return list(session.exec(select(PushOutbox).where(PushOutbox.username == user)).all())

    def close(self) -> None:
        for child in self.daemons:
            child.stop()


@pytest.fixture
async def push(
    shared_stack: Stack, receiver: PushReceiver, tmp_path: Path
) -> AsyncIterator[PushStack]:
    port = free_port()
    settings = daemon.build(
        ApiSettings,
        database_url=shared_stack.database_url,
        host=LOOPBACK,
        port=port,
        push_allow_hosts=[LOOPBACK],
    )
    api = Daemon(
        "api-push", "history_api", {}, tmp_path, settings=settings, ports=[(LOOPBACK, port)]
    )
    await asyncio.to_thread(api.start_ready)
    p = PushStack(shared_stack, receiver, tmp_path, f"http://{LOOPBACK}:{port}")
    try:
        yield p
    finally:
        p.close()
        api.stop()
    assert receiver.failures == []


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait, off the event loop, until ``condition`` holds: at most WAIT seconds."""
    await asyncio.to_thread(wait_until, condition, timeout=WAIT, what=what)


async def wait_received(push: PushStack, name: str, count: int = 1) -> None:
    await asyncio.to_thread(
        push.receiver.wait_for,
        lambda r: len(r.to(name)) >= count,
        WAIT,
        f"{count} push(es) to {name}",
    )


async def first_push(push: PushStack, collapse: float) -> tuple[str, str, ChatClient, str]:
    """alice's first message ("one") to bob, pushed to bob's subscribed phone by a
    daemon with ``collapse``: (bob, his subscription's name, alice's client, their
    conversation)."""
    alice, bob = await push.stack.new_users("alice", "bob")
    name = await push.subscribe(bob)
    push.start(collapse=collapse)
    sender = await push.stack.client(alice)
    first = await sender.send("one", to=bob, timeout=20)
    await wait_received(push, name)
    return bob, name, sender, first.conversation


async def test_an_offline_recipient_is_pushed_at_once(push: PushStack) -> None:
    alice, bob = await push.stack.new_users("alice", "bob")
    name = await push.subscribe(bob)
    push.start()
    sender = await push.stack.client(alice)

    started = time.monotonic()
    sent = await sender.send("hello", to=bob, timeout=20)
    await wait_received(push, name)

    (received,) = push.receiver.to(name)
    assert received.at - started < GRACE + MARGIN
    # Who wrote, where, how many; never the text by default.
    assert received.payload == {
        "v": 1,
        "conversation": sent.conversation,
        "from": alice,
        "seq": sent.seq,
        "count": 1,
    }
    async with push.api(bob) as api:
        key = (await api.get("/v1/push/key")).json()["vapid_public_key"]
    assert received.claims["k"] == key
    # The trace lists bob's subscription and the push that covered the message.
    await eventually(
        lambda: [r.state for r in push.outbox(bob)] == ["sent"], "the push recorded as sent"
    )
    async with push.api(alice) as api:
        trace = (await api.get(f"/v1/messages/{sent.id}")).json()
    assert [(p["user"], p["device"], p["channel"], p["state"]) for p in trace["push"]] == [
        (bob, "phone", "webpush", "sent")
    ]


async def test_a_device_online_that_does_not_ack_is_pushed_after_the_grace(
    push: PushStack,
) -> None:
    alice, bob = await push.stack.new_users("alice", "bob")
    name = await push.subscribe(bob)
    push.start()
    # Online (a presence announcement) but never acknowledging: an app frozen in the
    # background, a connection that died without its will yet.
    link = await push.stack.raw(bob)
    await link.publish(
        topics.up(bob, "presence"), encode(UpPresence(device="phone", state="online")), qos=1
    )

    def online() -> bool:
        with Session(push.stack.engine) as session:
            device = session.get(Device, (bob, "phone"))
            return device is not None and device.online

    await eventually(online, "bob online")
    sender = await push.stack.client(alice)

    started = time.monotonic()
    await sender.send("are you there?", to=bob, timeout=20)
    await wait_received(push, name)

    (received,) = push.receiver.to(name)
    assert GRACE * 0.9 <= received.at - started < GRACE + MARGIN
    assert received.payload["count"] == 1


async def test_a_connected_recipient_who_acks_in_time_is_not_pushed(push: PushStack) -> None:
    alice, bob = await push.stack.new_users("alice", "bob")
    name = await push.subscribe(bob)
    push.start()
    sender = await push.stack.client(alice)
    phone = await push.stack.client(bob)

    sent = await sender.send("hi", to=bob, timeout=20)
    assert (await phone.next_message(timeout=20)).body == "hi"

    await eventually(
        lambda: push.decided(bob, sent.conversation, sent.seq), "the decision on bob's message"
    )
    assert push.receiver.to(name) == []
    assert push.outbox(bob) == []


async def test_a_burst_is_one_notification_with_a_count(push: PushStack) -> None:
    alice, bob = await push.stack.new_users("alice", "bob")
    name = await push.subscribe(bob)
    mine = await push.subscribe(alice)
    push.start(collapse=1.0)
    sender = await push.stack.client(alice)

    for n in range(5):
        sent = await sender.send(f"message {n}", to=bob, timeout=20)
    await asyncio.to_thread(
        push.receiver.wait_for,
        lambda r: any(x.payload["count"] == 5 for x in r.to(name)),
        WAIT,
        "a push counting all five",
    )
    received = push.receiver.to(name)
    # The first at once, then what came meanwhile in one more: never one per message.
    assert len(received) <= 2
    assert len({r.headers["topic"] for r in received}) == 1
    assert [r.payload["count"] for r in received] == sorted(r.payload["count"] for r in received)
    assert received[-1].payload["seq"] == sent.seq
    # The sender's own devices are never pushed for what they sent.
    assert push.receiver.to(mine) == []


async def test_groups_push_every_member_and_tell_the_added_they_were_added(
    push: PushStack,
) -> None:
    """A group message pushes every member but its sender. Of the group's events only
    the one that made a user a member pushes, to that user, saying so (``event``);
    what came before a user joined is not counted for them."""
    alice, bob, carol = await push.stack.new_users("alice", "bob", "carol")
    names = {user: await push.subscribe(user) for user in (alice, bob, carol)}
    push.start(collapse=0.5)
    admin = await push.stack.client(alice)

    group = await admin.create_group("trip", [bob], timeout=20)
    await wait_received(push, names[bob])
    (made,) = push.receiver.to(names[bob])
    assert made.payload == {
        "v": 1,
        "conversation": group,
        "from": alice,
        "seq": 1,
        "count": 1,
        "event": "created",
    }
    before = await admin.send("before carol", conversation=group, timeout=20)
    await wait_received(push, names[bob], 2)

    added = await admin.add_members(group, [carol], timeout=20)
    await wait_received(push, names[carol])
    assert push.receiver.to(names[carol])[0].payload == {
        "v": 1,
        "conversation": group,
        "from": alice,
        "seq": added.seq,
        "count": 1,
        "event": "added",
    }
    assert added.seq == before.seq + 1

    sent = await admin.send("who drives?", conversation=group, timeout=20)
    for user in (bob, carol):
        await asyncio.to_thread(
            push.receiver.wait_for,
            lambda r, name=names[user]: any(x.payload["seq"] == sent.seq for x in r.to(name)),
            WAIT,
            f"{user} pushed for the message",
        )
    # bob never acknowledged anything: created, "before carol", the message (carol's
    # add is not news to him, and was never pushed to him on its own).
    assert [r.payload["count"] for r in push.receiver.to(names[bob])] == [1, 2, 3]
    # carol: her add and the message; "before carol" is from before she joined.
    last = push.receiver.to(names[carol])[-1].payload
    assert (last["count"], last["from"], "event" in last) == (2, alice, False)
    assert push.receiver.to(names[alice]) == []


async def test_a_read_on_another_device_stops_further_pushes_for_what_was_read(
    push: PushStack,
) -> None:
    """A read withdraws nothing already sent, but what it covers is not pushed again,
    and the next push counts only what came after it."""
    # A collapse window no test outlasts: the second message waits in it until the
    # test ends the window itself (below), after the read is stored.
    bob, name, sender, conversation = await first_push(push, collapse=3600.0)

    second = await sender.send("two", to=bob, timeout=20)
    await eventually(
        lambda: push.pending(bob, conversation) == second.seq,
        "the second message waiting in the collapse window",
    )
    laptop = await push.stack.client(bob, "laptop", ack_delivered=False)
    await laptop.mark_read(conversation, second.seq)
    await eventually(
        lambda: push.read_by(bob, conversation) >= second.seq, "the laptop's read stored"
    )
    push.end_collapse(bob, conversation)
    await eventually(
        lambda: push.decided(bob, conversation, second.seq), "the read message decided"
    )
    # Decided in the transaction that would have added its push: none was.
    assert [r.state for r in push.outbox(bob)] == ["sent"]  # the first push stands
    assert len(push.receiver.to(name)) == 1

    third = await sender.send("three", to=bob, timeout=20)
    await eventually(
        lambda: push.pending(bob, conversation) == third.seq,
        "the third message waiting in the collapse window",
    )
    push.end_collapse(bob, conversation)
    await wait_received(push, name, 2)
    last = push.receiver.to(name)[-1].payload
    # Only what nobody has read yet: "three", not "two" again.
    assert (last["seq"], last["count"]) == (third.seq, 1)


async def test_mutes_stop_pushes(push: PushStack) -> None:
    bob, name, sender, conversation = await first_push(push, collapse=0.0)

    async with push.api(bob) as api:
        assert (await api.put(f"/v1/push/mutes/{conversation}")).status_code == 204
        settings = (await api.get("/v1/push/settings")).json()
        assert settings == {"muted": False, "preview": False, "muted_conversations": [conversation]}
    second = await sender.send("two", to=bob, timeout=20)
    await eventually(
        lambda: push.decided(bob, conversation, second.seq), "the muted message decided"
    )
    assert len(push.receiver.to(name)) == 1

    async with push.api(bob) as api:
        assert (await api.delete(f"/v1/push/mutes/{conversation}")).status_code == 204
        response = await api.put("/v1/push/settings", json={"muted": True, "preview": False})
        assert response.json()["muted"] is True
    third = await sender.send("three", to=bob, timeout=20)
    await eventually(
        lambda: push.decided(bob, conversation, third.seq), "the message of a muted user decided"
    )
    assert len(push.receiver.to(name)) == 1

    # Unmuted, with previews: the text comes along, encrypted to the device.
    async with push.api(bob) as api:
        await api.put("/v1/push/settings", json={"muted": False, "preview": True})
    await sender.send("four", to=bob, timeout=20)
    await wait_received(push, name, 2)
    last = push.receiver.to(name)[-1].payload
    # Nothing was acknowledged: one to four all wait.
    assert (last["body"], last["count"]) == ("four", 4)


async def test_a_gone_subscription_is_removed(push: PushStack) -> None:
    alice, bob = await push.stack.new_users("alice", "bob")
    name = await push.subscribe(bob, "phone", (410, {}))
    push.start()
    sender = await push.stack.client(alice)
    await sender.send("hello", to=bob, timeout=20)

    def removed() -> bool:
        with Session(push.stack.engine) as session:
            return session.get(PushSubscription, (bob, "phone")) is None

    await eventually(removed, "the subscription removed")
    assert push.receiver.answers.count((f"/{name}", 410)) == 1
    assert [(r.state, r.outcome) for r in push.outbox(bob)] == [("gone", "410")]


async def test_throttling_and_errors_are_retried_honouring_retry_after(push: PushStack) -> None:
    alice, bob = await push.stack.new_users("alice", "bob")
    name = await push.subscribe(bob, "phone", (429, {"Retry-After": "1"}), (503, {}))
    push.start()
    sender = await push.stack.client(alice)
    await sender.send("hello", to=bob, timeout=20)
    await wait_received(push, name)

    assert [status for path, status in push.receiver.answers if path == f"/{name}"] == [
        429,
        503,
        201,
    ]
    await eventually(
        lambda: [(r.state, r.attempts) for r in push.outbox(bob)] == [("sent", 1)],
        "one claim, sent",
    )


async def test_a_push_daemon_killed_after_deciding_pushes_once_after_restart(
    push: PushStack,
) -> None:
    alice, bob = await push.stack.new_users("alice", "bob")
    name = await push.subscribe(bob)
    doomed = push.push_daemon("push-doomed", crash_after_decisions=1)
    await asyncio.to_thread(doomed.start_ready)
    exited = doomed.exited()
    sender = await push.stack.client(alice)
    await sender.send("hello", to=bob, timeout=20)

    assert await asyncio.wait_for(exited, WAIT) != 0  # SIGKILLed itself
    assert push.receiver.to(name) == []
    assert [r.state for r in push.outbox(bob)] == ["due"]

    # Two daemons now, racing for the same row: one push.
    push.start("push-a")
    push.start("push-b")
    await wait_received(push, name)
    await eventually(
        lambda: [r.state for r in push.outbox(bob)] == ["sent"], "the push recorded as sent"
    )
    assert len(push.receiver.to(name)) == 1


async def test_endpoints_on_private_addresses_are_refused(push: PushStack) -> None:
    (bob,) = await push.stack.new_users("bob")
    keys = DeviceKeys.new().subscription_keys()
    async with push.api(bob) as api:
        for endpoint in (
            "http://push.example.com/x",  # not https
            "https://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
            "https://10.0.0.5/x",  # private
            "https://[::1]:8443/x",  # loopback, not in the allowlist
            "https://224.0.0.1/x",  # multicast
            "https://user:pw@push.example.com/x",  # credentials
        ):
            response = await api.post(
                "/v1/devices/phone/push", json={"endpoint": endpoint, "keys": keys}
            )
            assert response.status_code == 422, (endpoint, response.text)
            assert response.json()["error"]["code"] == "invalid_payload"


async def test_the_daemon_checks_the_address_again_when_it_sends(push: PushStack) -> None:
    """A subscription stored while its name resolved elsewhere (DNS rebinding): the
    daemon vets the address it connects to, and gives up without a request."""
    alice, bob = await push.stack.new_users("alice", "bob")
    with Session(push.stack.engine) as session:
        store_push.subscribe(
            session,
            bob,
            "phone",
            "webpush",
            "https://10.1.2.3/x",
            **DeviceKeys.new().subscription_keys(),
        )
        session.commit()
    push.start()
    sender = await push.stack.client(alice)
    await sender.send("hello", to=bob, timeout=20)
    await eventually(lambda: [r.state for r in push.outbox(bob)] == ["failed"], "the push refused")
    (row,) = push.outbox(bob)
    assert "10.1.2.3" in (row.outcome or "")


def test_vetting_refuses_every_kind_of_internal_address() -> None:
    nobody = Allowlist()
    for address in (
        "127.0.0.1",
        "10.1.1.1",
        "192.168.0.1",
        "169.254.1.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "224.0.0.1",
        "0.0.0.0",  # noqa: S104
        "::ffff:127.0.0.1",
        "100.64.0.1",
    ):
        with pytest.raises(EndpointRefused):
            vet("push.example", [address], nobody)
    # One bad address among good ones is enough to refuse.
    with pytest.raises(EndpointRefused):
        vet("push.example", ["93.184.216.34", "10.0.0.1"], nobody)
    assert vet("push.example", ["93.184.216.34"], nobody) == ["93.184.216.34"]
    allow = Allowlist.parse(["127.0.0.0/8", "push.internal"])
    assert vet("x", ["127.0.0.2"], allow) == ["127.0.0.2"]
    assert vet("push.internal", ["10.0.0.1"], allow) == ["10.0.0.1"]


def test_notifications_name_no_text_unless_opted_in() -> None:
    from push.senders import Notification

    plain = json.loads(Notification("c1", "alice", 3, 2).payload())
    assert "body" not in plain
    assert len(Notification("c1", "alice", 3, 2).topic) <= 32
