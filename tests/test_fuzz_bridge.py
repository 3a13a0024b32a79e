"""Hypothesis-generated hostile uplinks through a running stack, while others chat.

Mallory publishes, on every uplink kind (and on kinds and topic shapes that do not
exist), the payloads of ``tests/test_fuzz_decode.py`` plus some valid messages to
carol. ``protocol.decode`` and the bridge's rules are the oracle for each one: the
error code (and id) Mallory must get on ``down/error``, a ``sent`` receipt, or
silence. Meanwhile alice sends bob a numbered series. At the end:

* the bridge process is alive and logged no traceback;
* Mallory got exactly the predicted errors (as a multiset: a batch publishes its
  refusals before its typing errors) and receipts, and nothing else;
* the only stored messages of Mallory's are the valid ones to carol;
* bob got all of alice's messages, in order, with seqs 1..N.

Hypothesis is used as the generator (the examples are drawn up front, then sent):
the stack is too slow to shrink against, so a failure names the offending payload.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from sqlmodel import Session, select

from core.mqtt import Incoming, MqttLink
from protocol import MAX_PAYLOAD_BYTES, ProtocolError, UpMessage, UpTyping, decode, topics
from store.tables import Message

from .support.fuzz import FUZZ, UP_KINDS, dump, hostile_payloads
from .support.stack import Stack

#: Topic suffixes after ``chat/v1/u/mallory/up/``: the real kinds, an unknown one
#: and shapes that are no uplink kind (all refused with ``unknown_topic``).
SUFFIXES = [*UP_KINDS, "shout", "", "msg/extra"]
SENTINEL_CONVERSATION = "zz-sentinel"


@st.composite
def uplinks(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from(SUFFIXES))
    kind = suffix if suffix in UP_KINDS else "msg"
    if kind == "msg" and draw(st.integers(min_value=0, max_value=2)) == 0:
        # Some valid messages, to carol, with ids that may repeat (a resend).
        payload = dump(
            {
                "id": draw(st.sampled_from(["c1", "c2", "c3"]) | st.text(min_size=1, max_size=8)),
                "to": "carol",
                # NUL once wedged the bridge on PostgreSQL (every retry failed).
                "body": draw(st.sampled_from(["a\x00b", "hi"]) | st.text(min_size=1, max_size=50)),
            }
        )
    else:
        payload = draw(hostile_payloads(kind))
    return f"chat/v1/u/mallory/up/{suffix}", payload


def draw_uplinks() -> list[tuple[str, bytes]]:
    drawn: list[tuple[str, bytes]] = []

    @FUZZ
    @given(uplinks())
    def collect(uplink: tuple[str, bytes]) -> None:
        drawn.append(uplink)

    collect()
    return drawn


Expected = tuple[str, Any]  # ("error", (code, id)) | ("sent", id) | ("silence", None)


def oracle(topic: str, payload: bytes, bodies: dict[str, str]) -> Expected | None:
    """What the bridge must answer, or None for an uplink this test does not send.

    ``bodies`` holds the body first stored under each of Mallory's ids so far: the
    same id with another body is ``id_reused``.
    """
    if len(payload) > 2 * MAX_PAYLOAD_BYTES:
        return None  # over mosquitto's own limit: tests/test_bad_input.py covers it
    if topics.uplink_sender(topic) is None:
        return ("silence", None)  # not even a topic to answer on
    try:
        up = decode(topic, payload).payload
    except ProtocolError as exc:
        return ("error", (exc.code, exc.id))
    if isinstance(up, UpMessage):
        if up.to in ("alice", "bob", "mallory"):
            return None  # would be stored: not the kind of input this test is about
        if up.to == "carol":
            if bodies.setdefault(up.id, up.body) != up.body:
                return ("error", ("id_reused", up.id))
            return ("sent", up.id)
        if up.id in bodies:
            # An id already stored names that message: under it, another target is
            # refused as a reuse before the target is looked at (store.messages).
            return ("error", ("id_reused", up.id))
        if up.to is not None:
            return ("error", ("unknown_recipient", up.id))
        return ("error", ("unknown_conversation", up.id))
    if isinstance(up, UpTyping) and not up.typing:
        return ("silence", None)  # "stopped typing" with nothing relayed before: dropped
    if isinstance(up, UpTyping) or hasattr(up, "delivered"):
        return ("error", ("unknown_conversation", None))  # no conversation of mallory's
    return ("silence", None)  # presence: stored as device state, told to contacts, no answer


class Mallory:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str | None]] = []
        self.receipts: list[str] = []
        self.sentinel = asyncio.Event()
        self.link: MqttLink | None = None

    def on_message(self, m: Incoming) -> None:
        data = json.loads(m.payload)
        if m.topic == topics.down_error("mallory"):
            if SENTINEL_CONVERSATION in data["detail"]:
                self.sentinel.set()
            else:
                self.errors.append((data["code"], data.get("id")))
        elif m.topic == topics.down_receipt("mallory"):
            assert data["status"] == "sent", data
            self.receipts.append(data["id"])


def stored_by(stack: Stack, sender: str) -> list[str]:
    with Session(stack.engine) as session:
        return list(session.exec(select(Message.client_id).where(Message.sender == sender)).all())


async def test_hostile_uplinks_while_others_chat(stack: Stack) -> None:
    await stack.add_users("mallory", "alice", "bob", "carol")
    alice = await stack.client("alice")
    bob = await stack.client("bob")
    mallory = Mallory()
    link = await stack.raw("mallory", on_message=mallory.on_message)
    await link.subscribe(topics.down_all("mallory"), qos=1)

    bodies: dict[str, str] = {}
    plan = [(t, p, e) for t, p in draw_uplinks() if (e := oracle(t, p, bodies)) is not None]
    rounds = 20

    async def chat() -> None:
        for i in range(rounds):
            await alice.send(f"ping {i}", to="bob", timeout=30)

    async def attack() -> None:
        for topic, payload, _ in plan:
            await link.publish(topic, payload, qos=1)
        sentinel = UpTyping(conversation=SENTINEL_CONVERSATION)
        await link.publish(topics.up("mallory", "typing"), dump(sentinel.model_dump()), qos=1)

    await asyncio.gather(chat(), attack())
    await asyncio.wait_for(mallory.sentinel.wait(), 30)

    got = [await bob.next_message(timeout=30) for _ in range(rounds)]
    assert [(m.sender, m.body, m.seq) for m in got] == [
        ("alice", f"ping {i}", i + 1) for i in range(rounds)
    ]
    expected_errors = Counter(e[1] for _, _, e in plan if e[0] == "error")
    assert Counter(mallory.errors) == expected_errors, [
        (t, p[:120], e) for t, p, e in plan if e[0] == "error"
    ]
    sent_ids = [e[1] for _, _, e in plan if e[0] == "sent"]
    assert Counter(mallory.receipts) == Counter(sent_ids)
    assert sorted(stored_by(stack, "mallory")) == sorted(set(sent_ids))
    assert stack.bridge.process is not None
    assert stack.bridge.process.poll() is None
    assert "Traceback" not in stack.bridge.log_text()
    # Mixed enough to mean something: refusals of several codes, and some stored.
    assert len(expected_errors) >= 4, expected_errors
