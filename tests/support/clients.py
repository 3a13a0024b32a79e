"""Stock MQTT clients that record what they receive: probes for ACL, presence and wills.

A test that asks "what did this account see" connects one of these through
:meth:`Stack.raw` instead of the SDK, as mosquitto_sub or an IoT device would.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho

from core.mqtt import Incoming, MqttLink
from protocol import topics

from .stack import Stack, password_of

#: The bridge's service account on both stacks.
BRIDGE = "mqchat-bridge"


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll, bounded: MqttLink offers no event for a lost connection."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def paho_answer(stack: Stack, client: paho.Client) -> str:
    """Connect plain paho (nothing of mqchat between it and the broker); the reason the
    broker answered with, or why there was none. Blocking, 10 s at most."""
    answered = threading.Event()
    outcome: list[str] = []

    def on_connect(*args: object) -> None:
        outcome.append(str(args[3]))
        answered.set()

    def on_disconnect(*args: object) -> None:
        outcome.append(f"disconnected: {args[3]}")
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect(stack.host, stack.port, keepalive=30)
    try:
        for _ in range(100):
            client.loop(timeout=0.1)
            if answered.is_set():
                break
    finally:
        client.disconnect()
    return outcome[0] if outcome else "no answer"


@dataclass
class Recorder:
    messages: list[Incoming] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, message: Incoming) -> None:
        self.messages.append(message)
        self._changed.set()

    def payloads(self) -> set[bytes]:
        return {m.payload for m in self.messages}

    async def wait_for(self, payload: bytes, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while payload not in self.payloads():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Actor:
    name: str
    link: MqttLink
    seen: Recorder


def password_for(stack: Stack, name: str) -> str:
    """``name``'s password on ``stack``: the bridge's service account's, or a user's."""
    return (
        stack.bridge_settings.password.get_secret_value() if name == BRIDGE else password_of(name)
    )


async def connect_actor(stack: Stack, name: str, role: str) -> Actor:
    """``name`` (a user or :data:`BRIDGE`) connected with a recorder of what it receives."""
    seen = Recorder()
    link = await stack.raw(
        name,
        password_for(stack, name),
        client_id=f"{name}:{role}-{secrets.token_hex(3)}",
        on_message=seen,
    )
    return Actor(name, link, seen)


def probe(label: str) -> bytes:
    """A payload no other publish has: what a recorder waits for."""
    return json.dumps({"probe": label, "nonce": secrets.token_hex(6)}).encode()


class Watcher:
    """A signed-in user following their contacts' presence on their own
    ``down/presence``, as an app's contact list would (a stock client: no SDK)."""

    def __init__(self) -> None:
        self.seen: asyncio.Queue[tuple[str, dict[str, str]]] = asyncio.Queue()
        self.latest: dict[str, dict[str, str]] = {}
        #: Every snapshot received, as {username: entry}.
        self.snapshots: list[dict[str, dict[str, str]]] = []
        self.changed = asyncio.Event()
        self.link: MqttLink | None = None

    def on_message(self, m: Incoming) -> None:
        payload = json.loads(m.payload)
        if payload["snapshot"]:
            self.snapshots.append({entry["username"]: entry for entry in payload["users"]})
        for entry in payload["users"]:
            self.seen.put_nowait((entry["username"], entry))
            self.latest[entry["username"]] = entry
        self.changed.set()

    async def start(self, stack: Stack, name: str = "carol") -> None:
        self.link = await stack.raw(name, on_message=self.on_message)
        await self.link.subscribe(topics.down_presence(name), qos=1)

    async def snapshot(self, timeout: float = 20) -> dict[str, dict[str, str]]:
        """Wait for the first snapshot (one message: fewer than 100 contacts)."""
        async with asyncio.timeout(timeout):
            while not self.snapshots:
                self.changed.clear()
                await self.changed.wait()
            return self.snapshots[0]

    async def state_of(self, user: str, state: str, timeout: float = 20) -> dict[str, str]:
        """Wait until the user's latest published presence is ``state``."""
        async with asyncio.timeout(timeout):
            while self.latest.get(user, {}).get("state") != state:
                self.changed.clear()
                await self.changed.wait()
            return self.latest[user]


async def watching(stack: Stack, user: str, watcher: str = "carol") -> Watcher:
    """``watcher`` following ``user``'s presence: both accounts made, the two of them
    contacts (``user`` wrote to ``watcher``), the :class:`Watcher` started."""
    await stack.add_users(user, watcher)
    stack.chatted(user, watcher)
    following = Watcher()
    await following.start(stack, watcher)
    return following
