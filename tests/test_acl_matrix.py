"""Isolation, proved by a matrix: every actor x every topic class x publish/subscribe.

On both brokers, for several users (names that are legal but tricky: ``bob`` and
``bobby`` share a prefix, one has 32 characters with ``.`` and ``_``) and the bridge's
service account, exactly the combinations the topic table allows succeed:

* publish: a probe with a unique payload on every observable topic; observers that
  are entitled to read the topic (the bridge account on ``up/#``, each user on their
  own ``down/#``) show which probes got through;
* subscribe: SUBACK granted or 0x80 refused for every filter; then traffic on every
  topic, and each prober must receive exactly what its granted filters match.

The expectation comes from the topic table of DESIGN.md, written out again below
and evaluated with the one topic matcher, ``protocol.topics.matches``, over sample
topics: the rules are this file's own, not ``protocol.acl``'s, which is the code under
test (and mosquitto matches with its own code).

"Nothing arrived" is never a sleep: after the probes, a sentinel that the observer
is entitled to is published on the same broker; once it is in, anything the probes
could have caused is in too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable

import pytest
from sqlmodel import Session, select

from core.accounts import register
from core.mqtt import ConnectRefused, MqttLink, SubscribeRefused
from protocol import topics
from protocol.errors import ProtocolError
from store.tables import Account

from .support import acl_table
from .support.acl_table import DOWN_KINDS, UP_KINDS, may
from .support.clients import BRIDGE, Recorder, connect_actor, probe
from .support.services import ROOT
from .support.stack import Stack, password_of, stored

LONG_NAME = "d.o_t" + "9" * 27  # 32 characters, the longest a username may be
USERS = ("alice", "bob", "bobby", LONG_NAME)
ACTORS = (*USERS, BRIDGE)


def test_the_oracle_reads_the_table_as_intended() -> None:
    """The oracle is itself code; pin the cases the matrix leans on."""
    assert may("bob", "publish", "chat/v1/u/bob/up/msg")
    assert not may("bob", "publish", "chat/v1/u/bobby/up/msg")
    assert not may("bob", "publish", "chat/v1/presence/bob")
    assert may("bob", "subscribe", "chat/v1/u/bob/down/+")
    assert not may("bob", "subscribe", "chat/v1/presence/alice")  # retired: contacts only
    assert not may("bob", "subscribe", "chat/v1/u/bob/#")
    assert not may("bob", "subscribe", "chat/v1/presence/#")
    assert not may("bob", "subscribe", "#")
    assert not may("bob", "subscribe", "chat/v1/u/+/down/#")
    assert may(BRIDGE, "subscribe", "chat/v1/u/+/up/#")
    assert not may(BRIDGE, "subscribe", "chat/v1/u/+/down/#")
    assert may(BRIDGE, "publish", "chat/v1/u/bob/down/msg")
    assert not may(BRIDGE, "publish", "chat/v1/u/bob/up/msg")
    assert not topics.matches("$SYS/broker/uptime", "+/#")


# -- what is probed ----------------------------------------------------------------


def subscribe_filters() -> list[str]:
    return acl_table.subscribe_filters(
        USERS,
        extra=(
            "chat/v1/u/+/down/msg",
            "chat/+/presence/+",
            "$SYS/broker/uptime",
            "$CONTROL/#",
            "$CONTROL/dynamic-security/v1/response",
        ),
    )


def observable_topics() -> list[str]:
    return acl_table.observable_topics(USERS)


def traffic_topics() -> list[str]:
    """What is published after the subscriptions, each by someone allowed to."""
    return observable_topics()


# -- connections that record what they receive --------------------------------------


async def _publish_all(items: Iterable[tuple[MqttLink, str, bytes, bool]]) -> None:
    """Publish at QoS 1 and wait for every PUBACK."""
    async with asyncio.timeout(30):
        await asyncio.gather(*(link.publish(t, p, qos=1, retain=r) for link, t, p, r in items))


def _table(rows: Iterable[tuple[str, str, bool]]) -> str:
    return "\n".join(
        f"  {who:>12} {'ALLOWED' if ok else 'denied':8} {what}" for who, what, ok in rows
    )


def _mismatches(
    results: dict[tuple[str, str], bool], expect: Callable[[str, str], bool]
) -> list[tuple[str, str, bool]]:
    return [(who, what, got) for (who, what), got in results.items() if got != expect(who, what)]


# -- the matrix ----------------------------------------------------------------------


async def test_exactly_the_allowed_combinations_succeed(stack: Stack) -> None:
    await stack.add_users(*USERS)

    # Observers, each subscribed only to what it is entitled to.
    up_observer = await connect_actor(stack, BRIDGE, "observer")
    await up_observer.link.subscribe("chat/v1/u/+/up/#", qos=1)
    down_observers = {user: await connect_actor(stack, user, "observer") for user in USERS}
    for user, observer in down_observers.items():
        await observer.link.subscribe(f"chat/v1/u/{user}/down/#", qos=1)

    def observers_of(topic: str) -> list[Recorder]:
        user, direction = topic.split("/")[3:5]
        return [up_observer.seen if direction == "up" else down_observers[user].seen]

    actors = {name: await connect_actor(stack, name, "prober") for name in ACTORS}

    # -- publish ------------------------------------------------------------------
    probes: dict[tuple[str, str], bytes] = {}
    for name in actors:
        for topic in observable_topics():
            probes[(name, topic)] = probe(f"{name} -> {topic}")
    # Asking mosquitto's admin API for the bridge's rights, and for a new account.
    # From a connection of its own: amqtt stops serving a session that publishes to a
    # '$' topic (it neither closes it nor answers it again), which would end bob's
    # probing here.
    escalator = await connect_actor(stack, "bob", "escalator")
    escalation = json.dumps(
        {
            "commands": [
                {"command": "addClientRole", "username": "bob", "rolename": "mqchat-bridge"},
                {"command": "createClient", "username": "evil-x", "password": "evil-x-pass-1"},
            ]
        }
    ).encode()
    await _publish_all(
        [
            *(
                (actors[name].link, topic, payload, False)
                for (name, topic), payload in probes.items()
            ),
            (escalator.link, "$CONTROL/dynamic-security/v1", escalation, False),
        ]
    )

    # Sentinels, each from an account allowed to reach that observer.
    sentinels: list[tuple[Recorder, bytes]] = []
    publishes = []
    for user, observer in down_observers.items():
        token = probe(f"sentinel down {user}")
        publishes.append((actors[BRIDGE].link, f"chat/v1/u/{user}/down/typing", token, False))
        sentinels.append((observer.seen, token))
    token = probe("sentinel up")
    publishes.append((actors["alice"].link, "chat/v1/u/alice/up/typing", token, False))
    sentinels.append((up_observer.seen, token))
    await _publish_all(publishes)
    for recorder, token in sentinels:
        await recorder.wait_for(token)

    published = {
        (name, topic): any(payload in r.payloads() for r in observers_of(topic))
        for (name, topic), payload in probes.items()
    }
    wrong = _mismatches(published, lambda who, topic: may(who, "publish", topic))
    assert not wrong, "publish outcomes differ from the topic table:\n" + _table(wrong)
    assert sum(published.values()) == len(USERS) * (len(UP_KINDS) + len(DOWN_KINDS))

    # -- subscribe ------------------------------------------------------------------
    granted: dict[tuple[str, str], bool] = {}
    for name, actor in actors.items():
        actor.seen.messages.clear()
        for topic_filter in subscribe_filters():
            try:
                async with asyncio.timeout(10):
                    await actor.link.subscribe(topic_filter, qos=1)
            except SubscribeRefused:
                granted[(name, topic_filter)] = False
            else:
                granted[(name, topic_filter)] = True
    wrong = _mismatches(granted, lambda who, f: may(who, "subscribe", f))
    assert not wrong, "subscribe outcomes differ from the topic table:\n" + _table(wrong)

    # Traffic on every topic, from someone allowed to publish it.
    traffic = actors | {"bridge-traffic": await connect_actor(stack, BRIDGE, "traffic")}
    items = []
    for topic in traffic_topics():
        user = topic.split("/")[3]
        sender = traffic[user] if "/up/" in topic else traffic["bridge-traffic"]
        items.append((sender.link, topic, probe(f"traffic {topic}"), False))
    await _publish_all(items)
    sentinels = []
    publishes = []
    for name in USERS:
        token = probe(f"sentinel sub {name}")
        publishes.append(
            (traffic["bridge-traffic"].link, f"chat/v1/u/{name}/down/typing", token, False)
        )
        sentinels.append((actors[name].seen, token))
    token = probe("sentinel sub bridge")
    publishes.append((actors["alice"].link, "chat/v1/u/alice/up/typing", token, False))
    sentinels.append((actors[BRIDGE].seen, token))
    await _publish_all(publishes)
    for recorder, token in sentinels:
        await recorder.wait_for(token)

    for name, actor in actors.items():
        filters = [f for (who, f), ok in granted.items() if who == name and ok]
        received = {m.topic for m in actor.seen.messages}
        leaked = {t for t in received if not any(topics.matches(t, f) for f in filters)}
        assert not leaked, f"{name} received topics it may not subscribe to: {sorted(leaked)}"
        expected = {t for t in traffic_topics() if any(topics.matches(t, f) for f in filters)}
        assert expected <= received, f"{name} missed {sorted(expected - received)}"

    # The $CONTROL publish changed nothing: no bridge rights for bob, no new account.
    with pytest.raises(SubscribeRefused):
        await actors["bob"].link.subscribe("chat/v1/u/+/up/#", qos=1)
    with pytest.raises(ConnectRefused):
        await stack.raw("evil-x", "evil-x-pass-1")


async def test_the_sender_is_the_topic_never_the_payload(stack: Stack) -> None:
    await stack.add_users("alice", "bob")
    bob = await stack.client("bob")
    alice = await stack.raw("alice")
    # alice claims to be bob, writing to bob: the stored and delivered sender is alice.
    forged = {"id": "forged-from", "to": "bob", "body": "it is me, bob", "from": "bob"}
    await alice.publish("chat/v1/u/alice/up/msg", json.dumps(forged).encode(), qos=1)
    got = await bob.next_message(timeout=20)
    assert (got.id, got.sender) == ("forged-from", "alice")
    [row] = stored(stack)
    assert (row.sender, row.client_id) == ("alice", "forged-from")


# -- identities with wildcard characters ------------------------------------------------

ILLEGAL_NAMES = ["+", "#", "a+b", "a#b", "a/b", "alice/#", "chat/v1/u/+", "$sys", "$SYS/x", "$"]
#: Wildcards and topic-like text after the "bob:" that client ids must start with
#: (docs/protocol.md); ids without it are refused on mosquitto (test_accounts.py).
ODD_CLIENT_IDS = [
    f"bob:{odd}"
    for odd in ("+", "#", "bob/+/#", "$SYS", "$SYS/broker", "chat/v1/u/alice/down/#", "+#$/")
]


async def test_wildcards_in_usernames_and_client_ids_give_no_rights(stack: Stack) -> None:
    await stack.add_users("alice", "bob")
    async with stack.provisioner() as provisioner:
        for name in ILLEGAL_NAMES:
            with pytest.raises(ProtocolError) as refused:
                await register(stack.engine, provisioner, name, "long-enough-password")
            assert refused.value.code == "invalid_username", name
    with Session(stack.engine) as session:
        names = set(session.exec(select(Account.username)).all())
    assert names == {"alice", "bob"}
    for name in ILLEGAL_NAMES:
        with pytest.raises(ConnectRefused):
            await stack.raw(name, password_of("alice"))

    # A client id is not a topic: whatever characters it has, the connection gets
    # its user's rights and no more.
    for client_id in ODD_CLIENT_IDS:
        bob = await stack.raw("bob", client_id=client_id)
        await bob.subscribe("chat/v1/u/bob/down/#", qos=1)
        for topic_filter in ("chat/v1/u/alice/down/#", "chat/v1/u/+/up/#", "#", "$SYS/#"):
            with pytest.raises(SubscribeRefused):
                await bob.subscribe(topic_filter, qos=1)
        await bob.close()


# -- the bridge's service password ------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "env"),
    [
        ("bridge", {"MQCHAT_BRIDGE_DATABASE_URL": "sqlite:///unused.db"}),
        ("broker", {"MQCHAT_BROKER_DATABASE_URL": "sqlite:///unused.db"}),
        (
            "broker",
            {
                "MQCHAT_BROKER_DATABASE_URL": "sqlite:///unused.db",
                "MQCHAT_BROKER_BRIDGE_PASSWORD": "",
            },
        ),
    ],
)
def test_no_default_service_password(module: str, env: dict[str, str]) -> None:
    """Without a configured bridge password neither the bridge nor the broker starts."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MQCHAT_")}
    result = subprocess.run(
        [sys.executable, "-m", module],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78, result.stderr
    assert "password" in result.stderr.lower()
