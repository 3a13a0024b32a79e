"""One device's chat connection: :class:`ChatClient`.

::

    app.send() ─▶ outbox lane (per target) ─▶ up/msg ─▶ ... ─▶ down/receipt "sent" ─▶ send() returns
                          ▲ resend, same id, until "sent"
    down/msg ─▶ Inbox (per conversation: drop seen seqs, hold back gaps) ─▶ app.messages()

No loss: a message stays in the outbox until its ``sent`` receipt arrives (the
broker's PUBACK only says the broker has it) and is resent with the same ``id``
after a timeout or reconnect; the bridge's dedupe makes that safe.

Send order: within one lane (one ``to`` or ``conversation``) the next message is
published only once the previous one is stored. A lost uplink that is resent can
therefore never land behind a later one, whatever the broker does with in-flight
messages when the bridge restarts. A group change (``up/group``) rides the group's
lane like a message and is resent the same way (its ``id`` makes it idempotent too),
so a "bye" sent before :meth:`ChatClient.leave_group` is stored first.

Errors: every failure raised here is a :class:`MqchatError` (``_exceptions.py`` draws
the tree); paho's, httpx's and the MQTT link's own never reach the app. Only misuse
(a bad argument: ``ValueError``) and :meth:`ChatClient.next_message`'s timeout (asyncio's
``TimeoutError``: nothing failed, nothing came) are Python's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Literal

from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

import protocol
from core import mqtt
from core.mqtt import Incoming, LinkConfig, MqttLink, Will
from protocol import errors, topics
from protocol.models import GroupEvent, GroupOp

from ._exceptions import (
    CONNECTION_LOST,
    UNREACHABLE,
    ConnectError,
    ConnectRefused,
    HistoryError,
    MessageRefused,
    MqchatError,
    SendTimeout,
)
from ._history import GroupMember, HistoryClient

log = logging.getLogger(__name__)

#: Most seconds between two attempts to catch up after a reconnect.
CATCH_UP_RETRY_MAX = 5.0


def _history_unavailable(exc: BaseException) -> bool:
    """Worth retrying: the history API is unreachable or answers 5xx (database down)."""
    return isinstance(exc, ConnectError) or (isinstance(exc, HistoryError) and exc.status >= 500)


@dataclass(frozen=True, slots=True)
class Sent:
    """The bridge stored the message: its place in the conversation."""

    id: str
    conversation: str
    seq: int


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A stored message as this device shows it: in seq order, once.

    A group's membership changes come the same way, in the same order, with ``event``
    set (``added``, ``left``, ...; docs/protocol.md lists them): ``sender`` made the
    change, ``body`` says it in words, ``users`` / ``name`` / ``promoted`` carry its
    details. ``event`` is None for a message.
    """

    id: str
    conversation: str
    seq: int
    sender: str
    body: str
    sent_at: datetime
    event: GroupEvent | None = None
    users: tuple[str, ...] | None = None
    name: str | None = None
    promoted: tuple[str, ...] | None = None

    @classmethod
    def from_down(cls, down: protocol.DownMessage) -> ChatMessage:
        return cls(
            down.id,
            down.conversation,
            down.seq,
            down.from_,
            down.body,
            down.sent_at,
            event=down.event,
            users=None if down.users is None else tuple(down.users),
            name=down.name,
            promoted=None if down.promoted is None else tuple(down.promoted),
        )

    def down(self) -> protocol.DownMessage:
        """As it came on ``down/msg`` (the CLI's ``listen --json`` prints it so)."""
        return protocol.DownMessage(
            id=self.id,
            conversation=self.conversation,
            seq=self.seq,
            from_=self.sender,
            body=self.body,
            sent_at=self.sent_at,
            event=self.event,
            users=None if self.users is None else list(self.users),
            name=self.name,
            promoted=None if self.promoted is None else list(self.promoted),
        )


@dataclass
class _Outgoing:
    id: str
    lane: str
    topic: str
    payload: bytes
    done: asyncio.Future[Sent]


@dataclass
class _Held:
    """Messages of one conversation that arrived ahead of a gap."""

    delivered: int | None = None
    heap: list[tuple[int, ChatMessage]] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    gap_timer: asyncio.TimerHandle | None = None


async def _credential_password(history: HistoryClient, device: str) -> str:
    return (await history.mqtt_credential(device)).password


class ChatClient:
    """A chat device: connect, :meth:`send`, and iterate :meth:`messages`.

    Args:
        transport: ``websockets`` for MQTT over WebSocket (path ``/mqtt``).
        tls: verify and encrypt with this context (:func:`tls_context`);
            the port must then be a TLS listener's.
        device: names this device; the MQTT client id is ``{username}:{device}``, fixed,
            so the broker keeps the device's queue while it is offline.
        resend_after: seconds without a ``sent`` receipt before the same id is resent;
            each further resend waits twice as long, up to 8 times this.
        hold_back: seconds to wait for a missing seq before delivering past the gap.
        cursors: last seq this device has shown per conversation, to resume from.
        persistent: keep a session on the broker, so messages queue while this device
            is offline. ``False`` is for one-shot tools (``mqchat send``): a clean
            session under a client id of its own, which neither takes over the
            device's own connection nor swallows the messages queued for it.
        on_connection: called on the loop with ``(False, reason)`` when the connection
            is lost and ``(True, "")`` when it is back (the client reconnects by
            itself). A device whose session another connection with the same
            ``{username}:{device}`` took over sees only a loss: show it, or the user
            waits on a silent stall.
        mqtt_credentials: connect with a short-lived MQTT credential that ``history``
            fetches for this device before every connect (``password`` is then not
            sent to the broker); :meth:`sign_in` sets it.
        other_brokers: more nodes of a broker cluster (RabbitMQ), ``(host, port)``
            each, tried in turn after ``host:port``: when a node is lost the client
            reconnects to the next, where its session and queued messages are.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        device: str = "default",
        transport: Literal["tcp", "websockets"] = "tcp",
        tls: ssl.SSLContext | None = None,
        keepalive: int = 30,
        resend_after: float = 5.0,
        hold_back: float = 2.0,
        cursors: dict[str, int] | None = None,
        persistent: bool = True,
        ack_delivered: bool = True,
        presence_interval: float | None = 120.0,
        history: HistoryClient | None = None,
        on_connection: Callable[[bool, str], None] | None = None,
        mqtt_credentials: bool = False,
        other_brokers: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.username = username
        self._on_connection = on_connection
        self.device = device
        self.history = history
        self._catch_up_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.ack_delivered = ack_delivered
        self._to_ack: dict[str, int] = {}
        self._ack_scheduled = False
        # One-shot tools (persistent=False) do not make the user look online.
        self.presence_interval = presence_interval if persistent else None
        self._presence_task: asyncio.Task[None] | None = None
        will = None
        if self.presence_interval is not None:
            will = Will(
                topic=topics.up(username, "presence"),
                payload=self._presence_payload("offline"),
                qos=1,
                retain=False,
            )
        client_id = f"{username}:{device}"
        if not persistent:
            client_id += f".{uuid.uuid4().hex[:8]}"

        self.resend_after = resend_after
        self.hold_back = hold_back
        password_provider = None
        if mqtt_credentials:
            if history is None:
                raise ValueError("mqtt_credentials needs a history client to fetch them")
            password_provider = partial(
                _credential_password, history, client_id.removeprefix(f"{username}:")
            )
        self.link = MqttLink(
            LinkConfig(
                host=host,
                port=port,
                username=username,
                password=password,
                client_id=client_id,
                clean_session=not persistent,
                keepalive=keepalive,
                transport=transport,
                tls=tls,
                will=will,
                password_provider=password_provider,
                other_addresses=tuple(other_brokers),
            ),
            on_message=self._on_incoming,
            on_connect=self._on_reconnect,
            on_disconnect=self._on_lost,
        )
        self._outbox: dict[str, _Outgoing] = {}
        self._lanes: dict[str, asyncio.Queue[_Outgoing]] = {}
        self._lane_tasks: dict[str, asyncio.Task[None]] = {}
        self._kick: dict[str, asyncio.Event] = {}
        self._inbox: asyncio.Queue[ChatMessage] = asyncio.Queue()
        self._held: dict[str, _Held] = {
            conv: _Held(delivered=seq) for conv, seq in (cursors or {}).items()
        }
        #: Refusals nobody awaits: of an ack, typing or presence, or of a message whose
        #: ``send()`` is no longer waiting.
        self.errors: asyncio.Queue[MessageRefused] = asyncio.Queue()
        self.receipts: asyncio.Queue[protocol.Receipt] = asyncio.Queue()
        self.typing_events: asyncio.Queue[protocol.DownTyping] = asyncio.Queue()
        #: Each contact's latest presence (the users this user shares a conversation
        #: with), as the bridge tells it on ``down/presence``: a snapshot after this
        #: device comes online, then every change. Contacts never seen are absent.
        self.contacts: dict[str, protocol.ContactPresence] = {}
        #: Every presence word as it arrives (snapshot entries included), for an app
        #: that redraws a contact list on changes.
        self.presence_events: asyncio.Queue[protocol.ContactPresence] = asyncio.Queue()

    @classmethod
    def sign_in(
        cls,
        api_url: str,
        username: str,
        password: str,
        *,
        host: str,
        port: int,
        device: str = "default",
        verify: ssl.SSLContext | bool = True,
        **options: Any,
    ) -> ChatClient:
        """A device that signs in over the history API and never sends ``password``
        to the broker: each (re)connect fetches a short-lived MQTT credential for
        ``{username}:{device}`` (``POST /v1/mqtt-credentials``) and uses it instead.

        Not connected yet: ``await client.connect()`` or ``async with``. ``options``
        are the constructor's (``transport``, ``tls``, ``resend_after``...).
        """
        history = HistoryClient(api_url, username, password, verify=verify)
        return cls(
            host=host,
            port=port,
            username=username,
            password="",
            device=device,
            history=history,
            mqtt_credentials=True,
            **options,
        )

    async def __aenter__(self) -> ChatClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and subscribe to this user's downlink; then stay connected.

        With a history client, this device's cursors are read from the server first,
        and everything after them is fetched once connected (catch-up).

        Raises:
            ConnectRefused: the broker refused the credentials (or throttles them).
            ConnectError: the broker cannot be reached (``unreachable``) or dropped
                the connection while subscribing (``connection_lost``).
            HistoryError: the history API refused (``unauthorized``, ...).
        """
        if self.history is not None:
            for conversation, seq in (await self.history.cursors(self.device)).items():
                held = self._held.setdefault(conversation, _Held())
                held.delivered = max(held.delivered or 0, seq)
        where = f"{self.link.config.host}:{self.link.config.port}"
        try:
            await self.link.connect()
            await self.link.subscribe(topics.down_all(self.username), qos=1)
        except mqtt.ConnectRefused as exc:
            raise ConnectRefused(exc.reason) from exc
        except mqtt.SubscribeRefused as exc:
            raise ConnectRefused(str(exc)) from exc
        except (OSError, TimeoutError) as exc:
            raise ConnectError(UNREACHABLE, f"broker at {where}: {exc}") from exc
        except mqtt.MqttError as exc:
            # Connected, then cut off before the subscription was in place: on
            # mosquitto, typically another connection of this device taking it back.
            raise ConnectError(CONNECTION_LOST, f"broker at {where}: {exc}") from exc
        if self.presence_interval is not None:
            self._presence_task = asyncio.create_task(self._announce_presence())
        if self.history is not None:
            await self.catch_up()

    async def catch_up(self) -> None:
        """Fetch from the history API everything after this device's cursors.

        Raises:
            HistoryError: the API answered with an error.
            ConnectError: it cannot be reached.
        """
        assert self.history is not None
        for state in await self.history.conversations():
            held = self._held.setdefault(state.id, _Held())
            have = held.delivered or 0
            if state.last_seq <= have:
                continue
            for down in await self.history.messages_between(state.id, after=have):
                self._on_message(down)

    async def close(self) -> None:
        """Say ``offline`` (a clean disconnect fires no last will) and disconnect."""
        if self._catch_up_task is not None:
            self._catch_up_task.cancel()
        if self._presence_task is not None:
            self._presence_task.cancel()
            if self.link.is_connected:
                offline = self._publish_presence("offline")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(offline, 5)
        for task in self._lane_tasks.values():
            task.cancel()
        for task in self._lane_tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for held in self._held.values():
            if held.gap_timer is not None:
                held.gap_timer.cancel()
        await self.link.close()
        if self.history is not None:
            await self.history.close()

    @property
    def pending(self) -> list[str]:
        """Ids still in the outbox (not yet confirmed stored)."""
        return list(self._outbox)

    async def send(
        self,
        body: str,
        *,
        to: str | None = None,
        conversation: str | None = None,
        id: str | None = None,
        timeout: float | None = None,
    ) -> Sent:
        """Send a message and wait until it is stored.

        Raises:
            MessageRefused: the bridge refused it (``unknown_recipient``, ...) or it is
                invalid before sending (``body_too_large``, ``invalid_payload``,
                ``payload_too_large``).
            SendTimeout: no receipt within ``timeout``; the message stays in the
                outbox and is still resent.
        """
        message_id = id or uuid.uuid4().hex
        try:
            up = protocol.UpMessage(id=message_id, to=to, conversation=conversation, body=body)
        except ValidationError as exc:
            code = (
                errors.BODY_TOO_LARGE
                if len(body) > protocol.MAX_BODY_CHARS
                else errors.INVALID_PAYLOAD
            )
            raise MessageRefused(code, str(exc.errors()[0]["msg"]), message_id) from None
        lane = f"to:{to}" if to is not None else f"conversation:{conversation}"
        return await self._submit(up, topics.up_msg(self.username), lane, timeout)

    async def create_group(
        self,
        name: str,
        members: Sequence[str] = (),
        *,
        id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Create a group with this user as its first admin; returns its conversation id.

        Raises:
            MessageRefused: ``invalid_name``, ``unknown_user``, ``group_full``, ...
            SendTimeout: no answer within ``timeout``; the change is still resent.
        """
        sent = await self._group("create", None, id, timeout, name=name, members=list(members))
        return sent.conversation

    async def add_members(
        self,
        conversation: str,
        members: Sequence[str],
        *,
        id: str | None = None,
        timeout: float | None = None,
    ) -> Sent:
        """Add users to a group (admins only); they read it from the event's seq on.

        Raises:
            MessageRefused: ``forbidden``, ``already_member``, ``group_full``, ...
            SendTimeout: no answer within ``timeout``; the change is still resent.
        """
        return await self._group("add", conversation, id, timeout, members=list(members))

    async def remove_members(
        self,
        conversation: str,
        members: Sequence[str],
        *,
        id: str | None = None,
        timeout: float | None = None,
    ) -> Sent:
        """Remove members from a group (admins only); they keep what they had.

        Raises:
            MessageRefused: ``forbidden``, ``not_member``, ...
            SendTimeout: no answer within ``timeout``; the change is still resent.
        """
        return await self._group("remove", conversation, id, timeout, members=list(members))

    async def leave_group(
        self, conversation: str, *, id: str | None = None, timeout: float | None = None
    ) -> Sent:
        """Leave a group; the last admin leaving hands over to the longest member.

        Raises:
            MessageRefused: ``unknown_conversation`` if this user is not a member.
            SendTimeout: no answer within ``timeout``; the change is still resent.
        """
        return await self._group("leave", conversation, id, timeout)

    async def promote(
        self,
        conversation: str,
        members: Sequence[str],
        *,
        id: str | None = None,
        timeout: float | None = None,
    ) -> Sent:
        """Make members admins (admins only).

        Raises:
            MessageRefused: ``forbidden``, ``not_member``, ``already_admin``, ...
            SendTimeout: no answer within ``timeout``; the change is still resent.
        """
        return await self._group("promote", conversation, id, timeout, members=list(members))

    async def demote(
        self,
        conversation: str,
        members: Sequence[str],
        *,
        id: str | None = None,
        timeout: float | None = None,
    ) -> Sent:
        """Make admins plain members again (admins only; never the last admin).

        Raises:
            MessageRefused: ``forbidden``, ``not_admin``, ``last_admin``, ...
            SendTimeout: no answer within ``timeout``; the change is still resent.
        """
        return await self._group("demote", conversation, id, timeout, members=list(members))

    async def rename_group(
        self, conversation: str, name: str, *, id: str | None = None, timeout: float | None = None
    ) -> Sent:
        """Rename a group (admins only).

        Raises:
            MessageRefused: ``forbidden``, ``invalid_name``, ...
            SendTimeout: no answer within ``timeout``; the change is still resent.
        """
        return await self._group("rename", conversation, id, timeout, name=name)

    async def _group(
        self,
        op: GroupOp,
        conversation: str | None,
        id: str | None,
        timeout: float | None,
        **fields: Any,
    ) -> Sent:
        op_id = id or uuid.uuid4().hex
        try:
            up = protocol.UpGroup(id=op_id, op=op, conversation=conversation, **fields)
        except ValidationError as exc:
            raise MessageRefused(
                errors.INVALID_PAYLOAD, str(exc.errors()[0]["msg"]), op_id
            ) from None
        # A create has no conversation yet: a lane of its own, like a new 1:1 target.
        lane = f"conversation:{conversation}" if conversation else f"create:{op_id}"
        return await self._submit(up, topics.up(self.username, "group"), lane, timeout)

    async def _submit(
        self,
        up: protocol.UpMessage | protocol.UpGroup,
        topic: str,
        lane: str,
        timeout: float | None,
    ) -> Sent:
        """Put an uplink in the outbox and wait for its ``sent`` receipt."""
        payload = protocol.encode(up)
        if len(payload) > protocol.MAX_PAYLOAD_BYTES:
            raise MessageRefused(errors.PAYLOAD_TOO_LARGE, f"{len(payload)} bytes", up.id)
        existing = self._outbox.get(up.id)
        if existing is None:
            future = asyncio.get_running_loop().create_future()
            existing = _Outgoing(up.id, lane, topic, payload, future)
            self._outbox[up.id] = existing
            self._lane(lane).put_nowait(existing)
        try:
            return await asyncio.wait_for(asyncio.shield(existing.done), timeout)
        except TimeoutError:
            raise SendTimeout(up.id) from None

    async def members(self, conversation: str) -> list[GroupMember]:
        """A group's members and roles, from the history API (so this needs one).

        Raises:
            HistoryError: ``unknown_conversation`` if this user is not a member now.
            ConnectError: the history API cannot be reached.
        """
        if self.history is None:
            raise ValueError("members() reads the history API: give ChatClient a history=")
        return await self.history.members(conversation)

    async def mark_read(self, conversation: str, seq: int) -> None:
        """Tell the other members (and this user's other devices) that up to ``seq`` is read.

        Returns once the broker has it; a refusal arrives on :attr:`errors`.

        Raises:
            ConnectError: the link failed to publish (``connection_lost``).
        """
        ack = protocol.UpAck(conversation=conversation, read=seq, device=self.device)
        try:
            await self.link.publish(topics.up(self.username, "ack"), protocol.encode(ack), qos=1)
        except mqtt.MqttError as exc:
            raise ConnectError(CONNECTION_LOST, str(exc)) from exc

    def set_typing(self, conversation: str, typing: bool = True) -> None:
        """Show the others that this user is (or stopped) typing; QoS 0, best effort."""
        event = protocol.UpTyping(conversation=conversation, typing=typing)
        self.link.publish(topics.up(self.username, "typing"), protocol.encode(event), qos=0)

    async def messages(self) -> AsyncIterator[ChatMessage]:
        """Incoming messages, in seq order per conversation, each shown once."""
        while True:
            yield await self._inbox.get()

    async def next_message(self, timeout: float | None = None) -> ChatMessage:
        """The next incoming message, as :meth:`messages` yields it.

        Raises:
            TimeoutError: none within ``timeout`` (asyncio's: nothing failed).
        """
        return await asyncio.wait_for(self._inbox.get(), timeout)

    # -- sending --------------------------------------------------------------------

    def _lane(self, lane: str) -> asyncio.Queue[_Outgoing]:
        queue = self._lanes.get(lane)
        if queue is None:
            queue = self._lanes[lane] = asyncio.Queue()
            self._kick[lane] = asyncio.Event()
            self._lane_tasks[lane] = asyncio.create_task(self._run_lane(lane, queue))
        return queue

    async def _run_lane(self, lane: str, queue: asyncio.Queue[_Outgoing]) -> None:
        kick = self._kick[lane]
        while True:
            item = await queue.get()
            wait = self.resend_after
            while not item.done.done():
                kick.clear()
                # QoS 1: paho keeps it across reconnects; the future is only the PUBACK.
                self.link.publish(item.topic, item.payload, qos=1)
                waiter: asyncio.Future[Any] = asyncio.create_task(kick.wait())
                await asyncio.wait(
                    {item.done, waiter}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                # A bridge that is slow, not gone, must not be buried in resends (the
                # long chaos run saw 11,000 queued uplinks, mostly resends): double the
                # wait, up to 8 times resend_after, with jitter so lanes spread out. A
                # reconnect (kick) resends at once and starts over.
                if kick.is_set():
                    wait = self.resend_after
                else:
                    wait = min(wait * 2, self.resend_after * 8) * random.uniform(0.8, 1.0)
            self._outbox.pop(item.id, None)

    def _presence_payload(self, state: Literal["online", "offline"]) -> bytes:
        return protocol.encode(protocol.UpPresence(device=self.device, state=state))

    def _publish_presence(self, state: Literal["online", "offline"]) -> asyncio.Future[None]:
        topic = topics.up(self.username, "presence")
        return self.link.publish(topic, self._presence_payload(state), qos=1)

    async def _announce_presence(self) -> None:
        # Again and again, so the bridge can time out a device whose will was lost.
        assert self.presence_interval is not None
        while True:
            await asyncio.sleep(self.presence_interval)
            if self.link.is_connected:
                self._publish_presence("online")

    def _on_lost(self, reason: str) -> None:
        if self._on_connection is not None:
            self._on_connection(False, reason)

    def _on_reconnect(self, session_present: bool) -> None:
        if self._on_connection is not None and self.link.generation > 1:
            self._on_connection(True, "")
        if self.presence_interval is not None:
            self._publish_presence("online")
        # Resend the head of every lane now rather than after resend_after.
        for kick in self._kick.values():
            kick.set()
        if self.history is not None and self.link.generation > 1:
            # Whatever the broker dropped while we were away comes from the history.
            if self._catch_up_task is not None:
                self._catch_up_task.cancel()  # this one starts over
            self._catch_up_task = asyncio.create_task(self._catch_up_quietly())

    async def _catch_up_quietly(self) -> None:
        # Retried on a timer, not left to the next gap: what the broker dropped may be
        # the end of a conversation, and then no later message reveals the gap.
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_history_unavailable),
                wait=wait_random_exponential(multiplier=0.5, max=CATCH_UP_RETRY_MAX),
                before_sleep=lambda state: log.warning(
                    "catch-up failed, retrying: %s", state.outcome and state.outcome.exception()
                ),
            ):
                with attempt:
                    await self.catch_up()
        except MqchatError as exc:  # a 4xx: retrying will not help
            log.warning("catch-up failed: %s", exc)

    # -- receiving ------------------------------------------------------------------

    def _on_incoming(self, incoming: Incoming) -> None:
        parsed = topics.parse_user_topic(incoming.topic)
        if parsed is None or parsed.direction != "down":
            return
        try:
            if parsed.kind == "msg":
                self._on_message(protocol.DownMessage.model_validate_json(incoming.payload))
            elif parsed.kind == "receipt":
                self._on_receipt(protocol.Receipt.model_validate_json(incoming.payload))
            elif parsed.kind == "typing":
                self.typing_events.put_nowait(
                    protocol.DownTyping.model_validate_json(incoming.payload)
                )
            elif parsed.kind == "error":
                self._on_error(protocol.ErrorPayload.model_validate_json(incoming.payload))
            elif parsed.kind == "presence":
                self._on_presence(protocol.DownPresence.model_validate_json(incoming.payload))
        except ValidationError:
            log.warning("ignoring malformed %s payload", parsed.kind)

    def _on_presence(self, down: protocol.DownPresence) -> None:
        for word in down.users:
            known = self.contacts.get(word.username)
            # A snapshot taken before a change can arrive after it: the later word wins.
            if known is None or word.at >= known.at or not down.snapshot:
                self.contacts[word.username] = word
            self.presence_events.put_nowait(word)

    def _on_receipt(self, receipt: protocol.Receipt) -> None:
        if receipt.status == "sent" and receipt.id is not None:
            item = self._outbox.get(receipt.id)
            if item is not None and not item.done.done():
                item.done.set_result(Sent(receipt.id, receipt.conversation, receipt.seq))
                return
        self.receipts.put_nowait(receipt)

    def _on_error(self, payload: protocol.ErrorPayload) -> None:
        error = MessageRefused(payload.code, payload.detail, payload.id)
        item = self._outbox.get(payload.id) if payload.id is not None else None
        if item is not None and payload.code == errors.RATE_LIMITED:
            # Not stored, not refused: it stays at the head of its lane and is resent
            # after resend_after, like any message without a receipt.
            log.info("message %s rate limited; resending later", payload.id)
            return
        if item is not None and not item.done.done():
            item.done.set_exception(error)
            item.done.exception()  # retrieved here too: nobody may be awaiting it
            return
        self.errors.put_nowait(error)

    def _on_message(self, down: protocol.DownMessage) -> None:
        message = ChatMessage.from_down(down)
        held = self._held.setdefault(message.conversation, _Held())
        if held.delivered is None:
            # First sight of this conversation on this device: with the history at
            # hand, everything before it is a gap to fill; without, start here.
            held.delivered = 0 if self.history is not None else message.seq - 1
        if message.seq <= held.delivered or message.seq in held.seqs:
            return  # a redelivery or a resend: already shown
        heapq.heappush(held.heap, (message.seq, message))
        held.seqs.add(message.seq)
        self._drain(held)
        if held.heap and held.gap_timer is None:
            held.gap_timer = asyncio.get_running_loop().call_later(
                self.hold_back, self._give_up_gap, held
            )

    def _drain(self, held: _Held) -> None:
        assert held.delivered is not None
        while held.heap and held.heap[0][0] == held.delivered + 1:
            seq, message = heapq.heappop(held.heap)
            held.seqs.discard(seq)
            held.delivered = seq
            self._inbox.put_nowait(message)
            if self.ack_delivered:
                self._to_ack[message.conversation] = seq
                self._schedule_acks()
        if not held.heap and held.gap_timer is not None:
            held.gap_timer.cancel()
            held.gap_timer = None

    def _schedule_acks(self) -> None:
        # One delivered ack per conversation for everything that arrived together.
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        pending, self._to_ack = self._to_ack, {}
        for conversation, seq in pending.items():
            ack = protocol.UpAck(conversation=conversation, delivered=seq, device=self.device)
            self.link.publish(topics.up(self.username, "ack"), protocol.encode(ack), qos=1)

    def _give_up_gap(self, held: _Held) -> None:
        held.gap_timer = None
        if not held.heap:
            return
        if self.history is not None:
            task = asyncio.get_running_loop().create_task(self._fill_gap(held))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        self._skip_gap(held)

    async def _fill_gap(self, held: _Held) -> None:
        assert self.history is not None
        assert held.delivered is not None
        if not held.heap:
            return
        conversation = held.heap[0][1].conversation
        try:
            missing = await self.history.messages_between(
                conversation, after=held.delivered, before=held.heap[0][0]
            )
        except MqchatError as exc:
            log.warning("gap fill failed, retrying after the hold-back: %s", exc)
            held.gap_timer = asyncio.get_running_loop().call_later(
                self.hold_back, self._give_up_gap, held
            )
            return
        for down in missing:
            self._on_message(down)
        if held.heap and held.heap[0][0] > (held.delivered or 0) + 1:
            self._skip_gap(held)  # the history does not have them either

    def _skip_gap(self, held: _Held) -> None:
        first = held.heap[0][0]
        log.warning(
            "seq %s..%s never arrived; showing what came after",
            (held.delivered or 0) + 1,
            first - 1,
        )
        held.delivered = first - 1
        self._drain(held)
