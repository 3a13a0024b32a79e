"""The production mosquitto.conf with dynsec accounts: the topic table, enforced live.

One mosquitto (the production config, moved to a temp dir) serves the module; each
test makes its own users, so tests do not see each other's accounts or sessions.
Tests that restart or crash the broker start one of their own.

Absence is proved without sleeping: mosquitto handles one connection's packets in
order, and a QoS 1 PUBACK means the publish has been routed, so when a forbidden
publish is followed by an allowed marker (after the PUBACK), a subscriber that gets
the marker first will never get the forbidden one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import core.dynsec as dynsec_module
from broker.mosquitto import render_config
from core.dynsec import (
    BRIDGE_ROLE,
    USER_ROLE,
    Credentials,
    DynsecProvisioner,
    ProvisioningError,
    dynsec_bootstrap,
    user_acls,
    write_dynsec_bootstrap,
)
from core.mqtt import ConnectRefused, Incoming, LinkConfig, MqttLink, SubscribeRefused
from protocol import MAX_PAYLOAD_BYTES, acl, topics

from .support.services import PRODUCTION_CONFIG, MosquittoServer, start_mosquitto

WAIT = 10.0


class Peer:
    """A live connection and the messages it has received, in order."""

    def __init__(
        self, link: MqttLink, inbox: asyncio.Queue[Incoming], session_present: list[bool]
    ) -> None:
        self.link = link
        self.inbox = inbox
        #: ``session_present`` of every CONNACK so far.
        self.session_present = session_present

    async def next(self) -> Incoming:
        return await asyncio.wait_for(self.inbox.get(), WAIT)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await asyncio.wait_for(self.link.publish(topic, payload, qos=qos, retain=retain), WAIT)


@contextlib.asynccontextmanager
async def connected(
    server: MosquittoServer,
    credentials: Credentials,
    *,
    client_id: str | None = None,
    clean_session: bool = True,
    **options: object,
) -> AsyncIterator[Peer]:
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    config = server.link_config(
        credentials,
        client_id or f"{credentials.username}:test-{secrets.token_hex(4)}",
        clean_session=clean_session,
        **options,
    )
    session_present: list[bool] = []
    link = MqttLink(config, on_message=inbox.put_nowait, on_connect=session_present.append)
    peer = Peer(link, inbox, session_present)
    try:
        await link.connect()
        yield peer
    finally:
        await link.close()


async def refusal(server: MosquittoServer, credentials: Credentials) -> ConnectRefused:
    link = MqttLink(
        server.link_config(credentials, f"{credentials.username}:test-{secrets.token_hex(4)}")
    )
    try:
        with pytest.raises(ConnectRefused) as refused:
            await link.connect()
    finally:
        await link.close()
    return refused.value


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll, bounded: MqttLink offers no event to await for a lost connection."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


def admin_config(server: MosquittoServer) -> LinkConfig:
    return server.link_config(server.admin, f"admin-{secrets.token_hex(4)}", clean_session=True)


def new_name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    server = start_mosquitto(tmp_path_factory.mktemp("dynsec"))
    yield server
    server.close()


@pytest.fixture
async def provisioner(mosquitto: MosquittoServer) -> AsyncIterator[DynsecProvisioner]:
    async with DynsecProvisioner(admin_config(mosquitto)) as provisioner:
        yield provisioner


async def _account(provisioner: DynsecProvisioner, prefix: str) -> Credentials:
    credentials = Credentials(new_name(prefix), secrets.token_urlsafe(12))
    await provisioner.create_user(credentials.username, credentials.password)
    return credentials


@pytest.fixture
async def alice(provisioner: DynsecProvisioner) -> Credentials:
    return await _account(provisioner, "alice")


@pytest.fixture
async def bob(provisioner: DynsecProvisioner) -> Credentials:
    return await _account(provisioner, "bob")


@pytest.fixture
async def bridge(mosquitto: MosquittoServer) -> AsyncIterator[Peer]:
    """The bridge's account, subscribed to every uplink as the real bridge is."""
    async with connected(mosquitto, mosquitto.bridge) as peer:
        await peer.link.subscribe(topics.ALL_UPLINKS)
        yield peer


# -- the config file ---------------------------------------------------------------------


def test_render_config_moves_listeners_files_and_log(tmp_path: Path) -> None:
    rendered = render_config(
        PRODUCTION_CONFIG.read_text(), host="127.0.0.1", port=4567, ws_port=4568, data_dir=tmp_path
    )
    lines = rendered.splitlines()
    assert "listener 4567 127.0.0.1" in lines
    ws = lines.index("listener 4568 127.0.0.1")
    assert "protocol websockets" in lines[ws + 1 : ws + 3]
    assert f"persistence_location {tmp_path}/" in lines
    assert f"plugin_opt_config_file {tmp_path}/dynamic-security.json" in lines
    assert [line for line in lines if line.startswith("log_dest")] == ["log_dest stderr"]
    assert not any(
        line.startswith("listener") and "4567" not in line and "4568" not in line for line in lines
    )


def test_render_config_changes_nothing_else(tmp_path: Path) -> None:
    template = PRODUCTION_CONFIG.read_text()
    rendered = render_config(template, host="127.0.0.1", port=1, ws_port=2, data_dir=tmp_path)
    moved = (
        "listener",
        "persistence_location",
        "plugin_opt_config_file",
        "plugin_opt_credential_key_file",
        "log_dest",
    )
    kept = [line for line in template.splitlines() if not line.startswith(moved)]
    assert kept == [line for line in rendered.splitlines() if not line.startswith(moved)]


def test_render_config_needs_both_listeners(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="websockets"):
        render_config("listener 1883\n", host="h", port=1, ws_port=2, data_dir=tmp_path)


def _production_setting(name: str) -> str:
    for line in PRODUCTION_CONFIG.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return value.strip()
    raise AssertionError(f"{name} missing from mosquitto.conf")


def test_production_limits_follow_the_protocol() -> None:
    assert int(_production_setting("message_size_limit")) == 2 * MAX_PAYLOAD_BYTES
    assert _production_setting("per_listener_settings") == "false"
    assert _production_setting("allow_anonymous") == "false"
    assert _production_setting("persistence") == "true"


# -- the bootstrap file ------------------------------------------------------------------


def test_bootstrap_derives_roles_from_protocol_acl() -> None:
    admin = Credentials("mqchat-admin", "a")
    bridge = Credentials("mqchat-bridge", "b")
    data = dynsec_bootstrap(admin=admin, bridge=bridge)
    assert data["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": True,
        "subscribe": False,
        "unsubscribe": True,
    }
    roles = {role["rolename"]: role["acls"] for role in data["roles"]}
    kind = {"publish": "publishClientSend", "subscribe": "subscribePattern"}
    assert [(a["acltype"], a["topic"]) for a in roles[BRIDGE_ROLE]] == [
        (kind[rule.action], rule.pattern) for rule in acl.BRIDGE_RULES
    ]
    # Every user rule names the user now (presence left the shared topic); the shared
    # role stays, empty, for the accounts made before.
    assert roles[USER_ROLE] == []
    own = [(a["acltype"], a["topic"]) for a in user_acls("carol")]
    shared = [(kind[rule.action], rule.for_user("carol")) for rule in acl.USER_RULES]
    assert sorted(own) == sorted(shared)


def test_bootstrap_hashes_passwords_as_dynsec_does() -> None:
    data = dynsec_bootstrap(
        admin=Credentials("mqchat-admin", "s3cret"), bridge=Credentials("mqchat-bridge", "b")
    )
    client = next(c for c in data["clients"] if c["username"] == "mqchat-admin")
    salt = base64.b64decode(client["salt"])
    digest = hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, client["iterations"])
    assert base64.b64decode(client["password"]) == digest
    assert "s3cret" not in json.dumps(data)


def test_bootstrap_refuses_names_a_user_could_take() -> None:
    with pytest.raises(ValueError, match="collide"):
        dynsec_bootstrap(admin=Credentials("admin", "a"), bridge=Credentials("mqchat-bridge", "b"))


def test_bootstrap_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "dynamic-security.json"
    admin, bridge = Credentials("mqchat-admin", "a"), Credentials("mqchat-bridge", "b")
    write_dynsec_bootstrap(path, admin=admin, bridge=bridge)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_dynsec_bootstrap(path, admin=admin, bridge=bridge)


# -- connecting --------------------------------------------------------------------------


def test_production_config_loads(mosquitto: MosquittoServer) -> None:
    assert mosquitto.is_running
    log = mosquitto.log_path.read_text()
    assert f"Config loaded from {mosquitto.conf_path}" in log
    assert "running" in log
    assert "Error" not in log


async def test_anonymous_connect_refused(mosquitto: MosquittoServer) -> None:
    # A CONNECT without a username cannot be made through MqttLink, so hand-built:
    # MQTT 3.1.1, clean session, keepalive 60, client id "anonymous".
    variable_header = b"\x00\x04MQTT\x04\x02\x00\x3c"
    payload = b"\x00\x09anonymous"
    packet = b"\x10" + bytes([len(variable_header + payload)]) + variable_header + payload
    reader, writer = await asyncio.open_connection(mosquitto.host, mosquitto.port)
    try:
        writer.write(packet)
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), WAIT)
    finally:
        writer.close()
        await writer.wait_closed()
    assert connack == b"\x20\x02\x00\x05"  # CONNACK, return code 5: not authorised


async def test_wrong_password_refused(mosquitto: MosquittoServer, alice: Credentials) -> None:
    await refusal(mosquitto, Credentials(alice.username, alice.password + "x"))
    await refusal(mosquitto, Credentials("mqchat-bridge", "guess"))


async def test_new_account_connects_at_once(mosquitto: MosquittoServer, alice: Credentials) -> None:
    async with connected(mosquitto, alice) as peer:
        assert peer.link.is_connected


async def test_websockets_listener_enforces_the_same_rules(
    mosquitto: MosquittoServer, alice: Credentials, bob: Credentials, bridge: Peer
) -> None:
    async with connected(mosquitto, alice, port=mosquitto.ws_port, transport="websockets") as peer:
        with pytest.raises(SubscribeRefused):
            await peer.link.subscribe(topics.down_all(bob.username))
        await peer.publish(topics.up_msg(alice.username), b"over websockets")
    got = await bridge.next()
    assert (got.topic, got.payload) == (topics.up_msg(alice.username), b"over websockets")


# -- the bridge's account ----------------------------------------------------------------


async def test_bridge_reads_uplinks_and_writes_downlinks(
    mosquitto: MosquittoServer, alice: Credentials, bridge: Peer
) -> None:
    await bridge.publish(topics.down_msg("x"), b"to nobody")  # allowed, nobody listens
    async with connected(mosquitto, alice) as device:
        await device.link.subscribe(topics.down_all(alice.username))
        await bridge.publish(topics.down_msg(alice.username), b"hello alice")
        got = await device.next()
    assert (got.topic, got.payload) == (topics.down_msg(alice.username), b"hello alice")


async def test_bridge_cannot_forge_uplinks_or_read_downlinks(
    mosquitto: MosquittoServer, alice: Credentials, bridge: Peer
) -> None:
    with pytest.raises(SubscribeRefused):
        await bridge.link.subscribe(topics.ALL_DOWNLINKS)
    await bridge.publish(topics.up_msg(alice.username), b"forged by the bridge")
    async with connected(mosquitto, alice) as device:
        await device.publish(topics.up_msg(alice.username), b"marker")
    got = await bridge.next()
    assert got.payload == b"marker"


# -- a user's account --------------------------------------------------------------------


async def test_user_uplink_reaches_the_bridge(
    mosquitto: MosquittoServer, alice: Credentials, bridge: Peer
) -> None:
    async with connected(mosquitto, alice) as device:
        await device.publish(topics.up_msg(alice.username), b'{"id":"1","to":"bob","body":"hi"}')
    got = await bridge.next()
    assert got.topic == topics.up_msg(alice.username)
    assert got.payload == b'{"id":"1","to":"bob","body":"hi"}'


async def test_user_cannot_publish_as_someone_else(
    mosquitto: MosquittoServer, alice: Credentials, bob: Credentials, bridge: Peer
) -> None:
    async with connected(mosquitto, alice) as device:
        # mosquitto acknowledges the forbidden publish (MQTT 3.1.1 has no way to
        # say no) and drops it; the marker after it shows it never arrives.
        await device.publish(topics.up_msg(bob.username), b"forged")
        await device.publish(topics.up_msg(alice.username), b"marker")
    got = await bridge.next()
    assert (got.topic, got.payload) == (topics.up_msg(alice.username), b"marker")


@pytest.mark.parametrize(
    "topic_filter",
    [
        lambda me, other: topics.down_all(other),
        lambda me, other: "#",
        lambda me, other: topics.ALL_DOWNLINKS,
        lambda me, other: topics.ALL_UPLINKS,
        lambda me, other: topics.up_all(me),
        lambda me, other: f"{topics.PREFIX}/presence/#",
        lambda me, other: topics.ALL_PRESENCE,
        lambda me, other: topics.presence(other),
        lambda me, other: "$SYS/#",
        lambda me, other: "$CONTROL/#",
    ],
    ids=[
        "other-downlinks",
        "everything",
        "all-downlinks",
        "all-uplinks",
        "own-uplinks",
        "presence-subtree",
        "retired-presence",
        "retired-presence-of-one",
        "sys",
        "control",
    ],
)
async def test_user_cannot_subscribe_outside_own_tree(
    mosquitto: MosquittoServer,
    alice: Credentials,
    bob: Credentials,
    topic_filter: Callable[[str, str], str],
) -> None:
    async with connected(mosquitto, alice) as device:
        with pytest.raises(SubscribeRefused):
            await device.link.subscribe(topic_filter(alice.username, bob.username))


async def test_user_may_subscribe_own_downlinks_and_presence(
    mosquitto: MosquittoServer, alice: Credentials
) -> None:
    async with connected(mosquitto, alice) as device:
        for allowed in (
            topics.down_all(alice.username),
            topics.down_msg(alice.username),
            topics.down_presence(alice.username),
        ):
            assert await device.link.subscribe(allowed) == 1


async def test_presence_is_published_by_the_bridge_alone(
    mosquitto: MosquittoServer, alice: Credentials, bob: Credentials
) -> None:
    async with connected(mosquitto, bob) as watcher:
        await watcher.link.subscribe(topics.down_presence(bob.username))
        async with connected(mosquitto, alice) as device:
            await device.publish(topics.down_presence(bob.username), b"forged offline")
            await device.publish(topics.presence(alice.username), b"forged", retain=True)
        async with connected(mosquitto, mosquitto.bridge) as bridge:
            await bridge.publish(topics.down_presence(bob.username), b"online")
        # Published after the forgeries: a forged one that got through would come first.
        got = await watcher.next()
    assert (got.topic, got.payload) == (topics.down_presence(bob.username), b"online")


async def test_payload_size_limit(
    mosquitto: MosquittoServer, alice: Credentials, bridge: Peer
) -> None:
    over_bridge_limit = b"a" * (MAX_PAYLOAD_BYTES + 1)
    at_broker_limit = b"b" * (2 * MAX_PAYLOAD_BYTES)
    over_broker_limit = b"c" * (2 * MAX_PAYLOAD_BYTES + 1)
    async with connected(mosquitto, alice) as device:
        for payload in (over_bridge_limit, at_broker_limit, over_broker_limit, b"marker"):
            await device.publish(topics.up_msg(alice.username), payload)
        assert device.link.is_connected  # dropped, not disconnected
    received = [(await bridge.next()).payload for _ in range(3)]
    assert received == [over_bridge_limit, at_broker_limit, b"marker"]


# -- changing accounts -------------------------------------------------------------------


async def kicked_and_refused(
    mosquitto: MosquittoServer, credentials: Credentials, change: Callable[[], Awaitable[object]]
) -> None:
    """``change``, made to the account of a live connection, drops that connection,
    and the credentials that connected it are refused after."""
    async with connected(mosquitto, credentials) as device:
        await change()
        await wait_until(lambda: not device.link.is_connected)
    await refusal(mosquitto, credentials)


async def test_disable_user_kicks_and_refuses(
    mosquitto: MosquittoServer, provisioner: DynsecProvisioner, alice: Credentials
) -> None:
    await kicked_and_refused(mosquitto, alice, lambda: provisioner.disable_user(alice.username))
    await provisioner.enable_user(alice.username)
    async with connected(mosquitto, alice):
        pass


async def test_set_password_replaces_the_old_one(
    mosquitto: MosquittoServer, provisioner: DynsecProvisioner, alice: Credentials
) -> None:
    renewed = Credentials(alice.username, "a fresh password")
    # dynsec 2.0.11 also drops the live connections of the account.
    await kicked_and_refused(
        mosquitto, alice, lambda: provisioner.set_password(alice.username, renewed.password)
    )
    async with connected(mosquitto, renewed) as device:
        assert device.link.is_connected


async def test_delete_user_kicks_refuses_and_frees_the_name(
    mosquitto: MosquittoServer, provisioner: DynsecProvisioner, alice: Credentials
) -> None:
    await kicked_and_refused(mosquitto, alice, lambda: provisioner.delete_user(alice.username))
    await provisioner.create_user(alice.username, "second life")
    async with connected(mosquitto, Credentials(alice.username, "second life")):
        pass


async def test_create_existing_user_fails(
    provisioner: DynsecProvisioner, alice: Credentials
) -> None:
    with pytest.raises(ProvisioningError) as failed:
        await provisioner.create_user(alice.username, "again")
    assert failed.value.command == "createRole"
    assert "exists" in failed.value.error


async def test_invalid_username_never_reaches_the_broker(provisioner: DynsecProvisioner) -> None:
    for bad in ("a/b", "+", "#", "$sys", "Alice", "mqchat-bridge"):
        with pytest.raises(ValueError, match="username"):
            await provisioner.create_user(bad, "pw")


async def test_unanswered_command_times_out(
    mosquitto: MosquittoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Allowed for the admin, but no plugin answers there.
    monkeypatch.setattr(dynsec_module, "CONTROL_TOPIC", "$CONTROL/dynamic-security/v0")
    async with DynsecProvisioner(admin_config(mosquitto), timeout=0.2) as provisioner:
        with pytest.raises(ProvisioningError, match="no answer") as failed:
            await provisioner.disable_user("nobody")
    assert failed.value.command == "disableClient"


async def test_only_the_admin_may_provision(mosquitto: MosquittoServer, alice: Credentials) -> None:
    config = mosquitto.link_config(
        alice, f"{alice.username}:test-{secrets.token_hex(4)}", clean_session=True
    )
    with pytest.raises(SubscribeRefused):
        async with DynsecProvisioner(config):
            pass


# -- restarts and crashes (a broker of their own) ----------------------------------------


async def test_session_survives_restart(own_mosquitto: MosquittoServer) -> None:
    server = own_mosquitto
    carol = Credentials("carol", "carols password")
    async with DynsecProvisioner(admin_config(server)) as provisioner:
        await provisioner.create_user(carol.username, carol.password)
    async with connected(server, carol, client_id="carol:phone", clean_session=False) as phone:
        await phone.link.subscribe(topics.down_all(carol.username))
    async with connected(server, server.bridge) as bridge:
        await bridge.publish(topics.down_msg(carol.username), b"while you were away")

    server.restart()

    async with connected(server, carol, client_id="carol:phone", clean_session=False) as phone:
        got = await phone.next()
        assert phone.session_present == [True]
    assert (got.topic, got.payload) == (topics.down_msg(carol.username), b"while you were away")


async def test_accounts_survive_a_crash(own_mosquitto: MosquittoServer) -> None:
    server = own_mosquitto
    dave = Credentials("dave", "daves password")
    async with DynsecProvisioner(admin_config(server)) as provisioner:
        await provisioner.create_user(dave.username, dave.password)
    server.kill()  # dynsec writes its file on every change, not at autosave
    server.start()
    async with connected(server, dave) as device:
        await device.link.subscribe(topics.down_all(dave.username))
