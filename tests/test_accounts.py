"""An account's life on both stacks: password change, disable, enable, delete, and
client ids that cannot be used to reach someone else's session.

Client ids: a client id is the username or starts with ``<username>:``
(docs/protocol.md). mosquitto enforces exactly that with our plugin
(broker/mosquitto_clientid/); the embedded broker binds an id to the first user that
presents it. Either way, another user's id is refused before any session is touched.

Each change goes through ``core.accounts`` as ``mqchat user ...`` and the HTTP
API make it: the database, plus dynsec on mosquitto. mosquitto drops the account's
connections when the command is answered; the embedded broker at its next look at the
accounts table (every 0.2 s in these tests), so the tests wait for the drop.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from datetime import timedelta

import pytest
from sqlmodel import Session

from core.accounts import change_password, delete, register, set_disabled
from core.mqtt import ConnectRefused, Incoming, MqttLink
from protocol import errors, topics
from protocol.errors import ProtocolError
from store import tokens

from .support.clients import wait_until
from .support.services import CLIENTID_PLUGIN, PRODUCTION_CONFIG
from .support.stack import Stack, password_of

WAIT = 15.0


async def refused(
    stack: Stack,
    user: str,
    password: str | None = None,
    client_id: str | None = None,
    *,
    clean_session: bool = True,
) -> str:
    """Connect once, expecting a refusal; the reason paho reports."""
    link = await stack.raw(
        user, password, client_id=client_id, clean_session=clean_session, connect=False
    )
    with pytest.raises(ConnectRefused) as refusal:
        await link.connect()
    await link.close()
    return refusal.value.reason


async def subscribed(
    stack: Stack, user: str, password: str | None = None
) -> tuple[MqttLink, asyncio.Queue[Incoming]]:
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    link = await stack.raw(user, password, on_message=inbox.put_nowait)
    await link.subscribe(topics.down_all(user), qos=1)
    return link, inbox


async def next_body(inbox: asyncio.Queue[Incoming]) -> str:
    while True:
        message = await asyncio.wait_for(inbox.get(), WAIT)
        if message.topic.endswith("/down/msg"):
            body = json.loads(message.payload)["body"]
            assert isinstance(body, str)
            return body


async def others_still_chat(stack: Stack) -> None:
    """alice and bob, untouched by what happened to carol, still exchange a message."""
    alice = await stack.client("alice", device=f"d{secrets.token_hex(2)}")
    bob = await stack.client("bob", device=f"d{secrets.token_hex(2)}")
    body = f"still here {secrets.token_hex(2)}"
    await alice.send(body, to="bob", timeout=WAIT)
    got = await bob.next_message(timeout=WAIT)
    assert (got.sender, got.body) == ("alice", body)


async def test_disabled_user_is_dropped_refused_and_can_be_enabled(stack: Stack) -> None:
    await stack.add_users("alice", "bob", "carol")
    carol, _ = await subscribed(stack, "carol")
    with Session(stack.engine) as session:
        issued = tokens.issue(session, "carol", timedelta(hours=1))
        session.commit()

    async with stack.provisioner() as provisioner:
        await set_disabled(stack.engine, provisioner, "carol", disabled=True)

    await wait_until(lambda: not carol.is_connected, "carol to be dropped")
    await carol.close()
    assert "not authori" in (await refused(stack, "carol", password_of("carol"))).lower()
    with Session(stack.engine) as session:
        assert tokens.resolve(session, issued.token) is None
    await others_still_chat(stack)

    async with stack.provisioner() as provisioner:
        await set_disabled(stack.engine, provisioner, "carol", disabled=False)
    _again, inbox = await subscribed(stack, "carol")
    alice = await stack.client("alice", device="enabled")
    await alice.send("welcome back", to="carol", timeout=WAIT)
    assert await next_body(inbox) == "welcome back"
    with Session(stack.engine) as session:
        assert tokens.resolve(session, issued.token) is None  # tokens stay revoked


async def test_deleted_user_is_dropped_refused_and_keeps_the_name(stack: Stack) -> None:
    await stack.add_users("alice", "bob", "carol")
    carol, _ = await subscribed(stack, "carol")

    async with stack.provisioner() as provisioner:
        await delete(stack.engine, provisioner, "carol")

    await wait_until(lambda: not carol.is_connected, "carol to be dropped")
    await carol.close()
    assert "not authori" in (await refused(stack, "carol", password_of("carol"))).lower()
    await others_still_chat(stack)
    async with stack.provisioner() as provisioner:
        with pytest.raises(ProtocolError) as taken:
            await register(stack.engine, provisioner, "carol", "a new carol's password")
        assert taken.value.code == errors.USERNAME_TAKEN
        with pytest.raises(ProtocolError) as gone:
            await set_disabled(stack.engine, provisioner, "carol", disabled=False)
        assert gone.value.code == errors.UNKNOWN_USER


async def test_password_change_drops_old_connections_and_swaps_passwords(stack: Stack) -> None:
    await stack.add_users("alice", "bob", "carol")
    old, _ = await subscribed(stack, "carol")
    new_password = "carol's brand new password"

    async with stack.provisioner() as provisioner:
        await change_password(stack.engine, provisioner, "carol", new_password)

    await wait_until(lambda: not old.is_connected, "the old connection to be dropped")
    await old.close()
    assert "not authori" in (await refused(stack, "carol", password_of("carol"))).lower()
    renewed, inbox = await subscribed(stack, "carol", new_password)
    alice = await stack.client("alice", device="after-change")
    await alice.send("new password, same carol", to="carol", timeout=WAIT)
    assert await next_body(inbox) == "new password, same carol"
    assert renewed.is_connected


async def test_unknown_user_cannot_be_changed(stack: Stack) -> None:
    async with stack.provisioner() as provisioner:
        for change in (
            set_disabled(stack.engine, provisioner, "nobody", disabled=True),
            delete(stack.engine, provisioner, "nobody"),
            change_password(stack.engine, provisioner, "nobody", "long enough pw"),
        ):
            with pytest.raises(ProtocolError) as unknown:
                await change
            assert unknown.value.code == errors.UNKNOWN_USER


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
async def test_wrong_password_with_someones_client_id_leaves_them_alone(
    shared_stack: Stack, clean_session: bool
) -> None:
    """amqtt on its own would end alice's connection (persistent) or silently drop her
    subscriptions (clean) before checking the intruder's password."""
    stack = shared_stack
    alice_name, bob_name = await stack.new_users("alice", "bob")
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    alice = await stack.raw(
        alice_name,
        client_id=f"{alice_name}:phone",
        clean_session=clean_session,
        on_message=inbox.put_nowait,
    )
    await alice.subscribe(topics.down_all(alice_name), qos=1)
    generation = alice.generation

    reason = await refused(
        stack, alice_name, "not alices password", f"{alice_name}:phone", clean_session=clean_session
    )

    assert "not authori" in reason.lower()
    bob = await stack.client(bob_name)
    await bob.send("you are still subscribed", to=alice_name, timeout=WAIT)
    assert await next_body(inbox) == "you are still subscribed"
    assert alice.is_connected
    assert alice.generation == generation


async def test_another_user_cannot_take_a_client_id(shared_stack: Stack) -> None:
    """bob, signed in with his own password, presents alice's client id: refused, both
    while alice is online (her connection and subscription stay) and while she is away
    (her persistent session keeps the messages queued for her)."""
    stack = shared_stack
    alice_name, bob_name = await stack.new_users("alice", "bob")
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    sessions: list[bool] = []

    async def alices_phone() -> MqttLink:
        return await stack.raw(
            alice_name,
            client_id=f"{alice_name}:phone",
            clean_session=False,
            on_message=inbox.put_nowait,
            on_connect=sessions.append,
        )

    async def bob_is_refused_alices_id() -> None:
        for clean_session in (False, True):
            reason = await refused(
                stack, bob_name, client_id=f"{alice_name}:phone", clean_session=clean_session
            )
            assert "not authori" in reason.lower()

    alice = await alices_phone()
    await alice.subscribe(topics.down_all(alice_name), qos=1)
    generation = alice.generation

    await bob_is_refused_alices_id()
    bob = await stack.client(bob_name)
    await bob.send("only for alice", to=alice_name, timeout=WAIT)
    assert await next_body(inbox) == "only for alice"
    assert alice.is_connected
    assert alice.generation == generation

    await alice.close()
    await bob.send("queued for alice", to=alice_name, timeout=WAIT)  # the "sent" receipt
    await bob_is_refused_alices_id()

    await alices_phone()
    assert await next_body(inbox) == "queued for alice"
    assert sessions == [False, True]


# -- mosquitto: the client-id plugin -----------------------------------------------------


def test_clientid_plugin_is_asked_before_dynsec() -> None:
    """mosquitto 2.0 stops at the first plugin that does not defer; dynsec accepts a
    good password, so a client-id check listed after it would never run."""
    plugins = [
        line.split()[1]
        for line in PRODUCTION_CONFIG.read_text().splitlines()
        if line.startswith("plugin ")
    ]
    assert [path.rsplit("/", 1)[-1] for path in plugins] == [
        CLIENTID_PLUGIN,
        "mosquitto_dynamic_security.so",
    ]


ACCEPTED_IDS = ("alice", "alice:phone", "alice:", "alice:a:b/c+#")
REFUSED_IDS = ("alice-phone", "alicex:phone", "alic", "bob:alice", ":alice", "mqchat-bridge-1")


async def test_mosquitto_client_id_must_name_its_user(production_stack: Stack) -> None:
    stack = production_stack
    await stack.add_users("alice")
    for client_id in ACCEPTED_IDS:
        made = await stack.raw("alice", client_id=client_id)
        await made.subscribe(topics.down_all("alice"), qos=1)
        assert made.is_connected, client_id
        await made.close()
    for client_id in REFUSED_IDS:
        reason = await refused(stack, "alice", client_id=client_id)
        assert "not authori" in reason.lower(), client_id


def mosquitto_sub(stack: Stack, user: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """The stock client of the README: subscribe to one's downlink and exit (-E)."""
    return subprocess.run(
        [
            "mosquitto_sub",
            *("-h", stack.host, "-p", str(stack.port)),
            *("-u", user, "-P", password_of(user)),
            *("-t", topics.down_all(user), "-q", "1", "-E", "-W", "10"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


async def test_stock_client_with_a_foreign_client_id_is_told_why(production_stack: Stack) -> None:
    stack = production_stack
    assert stack.mosquitto is not None
    await stack.add_users("alice")

    ok = await asyncio.to_thread(mosquitto_sub, stack, "alice", "-i", "alice:cli")
    default_id = await asyncio.to_thread(mosquitto_sub, stack, "alice")
    foreign = await asyncio.to_thread(mosquitto_sub, stack, "alice", "-i", "alice-cli")

    assert ok.returncode == 0, ok.stderr
    for refused_run in (default_id, foreign):
        assert refused_run.returncode != 0
        assert "not authorised" in (refused_run.stdout + refused_run.stderr).lower()
    reason = (
        "refused client id 'alice-cli' for user 'alice': "
        "a client id must be 'alice' or start with 'alice:'"
    )
    assert reason in stack.mosquitto.log_tail(200)


async def test_mosquitto_service_accounts_may_use_any_client_id(production_stack: Stack) -> None:
    """The bridge (mqchat-bridge-1) and the admin (admin-...) are exempt by name
    (plugin_opt_exempt_users); the production stack's bridge already runs on it."""
    stack = production_stack
    assert stack.mosquitto is not None
    await stack.add_users("alice", "bob", "carol")
    async with stack.provisioner() as provisioner:  # client id admin-<hex>
        await set_disabled(stack.engine, provisioner, "carol", disabled=True)
    alice = await stack.client("alice")
    bob = await stack.client("bob")
    await alice.send("through the bridge", to="bob", timeout=WAIT)
    assert (await bob.next_message(timeout=WAIT)).body == "through the bridge"
