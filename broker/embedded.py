"""The embedded broker: amqtt with mqchat's sign-in gate and topic ACL.

amqtt speaks MQTT 3.1.1 only and keeps sessions in memory. mqchat adds::

    TCP/WS accept ──▶ MqchatBroker._client_connected
                        connect rate per source ──(over)──▶ CONNACK 3, close
                        read the CONNECT (bounded in time and size, broker.wire)
                            └─(other MQTT version)──▶ CONNACK 1; (malformed) close
                        Gate.admit: throttles, password (argon2) or MQTT credential
                                    (an HMAC and the account's token generation),
                                    client id rule, last will against the publish ACL
                            └─(refused)──▶ CONNACK 5 (or 3 while throttled), close;
                                           amqtt never sees it: no session is touched
                        amqtt's own handling, replaying the CONNECT
                            └─▶ AccountAuth.authenticate: only what the gate admitted
                        TopicAcl: a publish quota per user (quota.py), then
                                  protocol.acl on every publish, subscribe, delivery
                        PacketGuard: packet sizes, and 1.5 keepalives without a packet
                        ──▶ closed (the last will fires)
                        MqchatBroker overrides amqtt where it skips TopicAcl: wills,
                        retained messages (users retain nothing; sent on SUBSCRIBE
                        only), queued messages (retain 0)
    every account_poll s: accounts disabled, deleted, with a new password or
                        with their tokens revoked (sessions signed in by credential)
                        ──▶ their sessions deleted, connections dropped

Why the gate runs before amqtt: amqtt 0.12.1 deletes (clean session) or takes over
(persistent session) the existing session of a client id *before* it asks the auth
plugins, so a wrong password with alice's client id would end alice's connection or
subscriptions. Refusing before amqtt reads the CONNECT keeps alice untouched.

A user's client id must be the username or start with ``<username>:``
(``protocol.acl.client_id_allowed``, as mosquitto's plugin enforces): amqtt would
otherwise hand another user alice's persistent session, with its subscriptions and
queued messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session as DbSession

from core import credentials
from core.metrics import Check, database_check, new_registry
from core.throttle import Throttle
from protocol import acl
from store import accounts, make_engine, reading, signin, tokens

from . import quota
from .config import BrokerSettings
from .lognoise import CLIENT_LOG
from .metrics import BrokerMetrics
from .topic_index import TopicIndex
from .wire import PacketGuard, PacketRefused, read_connect

log = logging.getLogger(__name__)
#: What clients did wrong: rate-limited, one line each (broker.lognoise).
client_log = logging.getLogger(CLIENT_LOG)

#: CONNACK return codes of MQTT 3.1.1 that the gate answers with.
IDENTIFIER_REJECTED: Final = 0x02  # empty client id on a persistent session
SERVER_UNAVAILABLE: Final = 0x03  # throttled: try again later
NOT_AUTHORIZED: Final = 0x05  # wrong credentials, or another user's client id

#: The publishes the per-user quota counts: new messages (``chat/v1/u/{user}/up/msg``).
QUOTA_SUFFIX: Final = "/up/msg"

#: Where what an account signed in with is kept on its amqtt session (``Admitted``).
HASH_ATTRIBUTE: Final = "mqchat_password_hash"


def generation_key(generation: int) -> str:
    """What a session signed in by MQTT credential keeps instead of a password hash
    (no argon2 hash starts with ``generation:``)."""
    return f"generation:{generation}"


@dataclass(frozen=True, slots=True)
class Admitted:
    username: str
    #: What the account signed in with, checked again by the account watch: its
    #: password hash, or :func:`generation_key` of the credential's token generation.
    #: None for service accounts.
    signed_in_with: str | None


#: True while amqtt handles a SUBSCRIBE in this task: the one time retained messages go out.
_subscribing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mqchat_subscribing", default=False
)

#: Set by the gate for the task that hands an admitted connection to amqtt; amqtt
#: calls the auth plugin inside that task (or a task made from it).
_admitted: contextvars.ContextVar[Admitted | None] = contextvars.ContextVar(
    "mqchat_admitted", default=None
)


class Gate:
    """Who may connect, decided from the CONNECT alone, before amqtt acts on it."""

    def __init__(
        self,
        settings: BrokerSettings,
        engine: Engine,
        refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        #: Counts a refusal by its reason (``broker.metrics.REFUSAL_REASONS``).
        self.refused = refused
        # Sign-in lookups only read: no SQLite write lock, so a burst of CONNECTs
        # does not queue the bridge's commits (store.db.reading).
        self._engine = reading(engine)
        self.services = {settings.bridge_username: settings.bridge_password.get_secret_value()}
        secret = settings.mqtt_credential_secret
        self._credential_secret = secret.get_secret_value().encode() if secret else None
        self._connects = Throttle(settings.connect_rate)
        self._user_failures = Throttle(settings.auth_failures_per_user)
        self._source_failures = Throttle(settings.auth_failures_per_source)
        self._user_sign_ins = Throttle(settings.sign_ins_per_user)
        signin.configure(rate=settings.sign_ins_per_second, burst=settings.sign_in_burst)

    def connection_allowed(self, source: str) -> bool:
        """Count a new connection from ``source``; False once it opens too many."""
        return self._connects.hit("connect", source)

    async def admit(
        self, source: str, client_id: str, username: str | None, password: str | None
    ) -> Admitted | int:
        """Check a CONNECT: what was admitted, or the CONNACK return code to refuse with."""
        if not username or password is None:
            self.refused("no_credentials")
            return NOT_AUTHORIZED
        service = username in self.services
        throttled = not self._source_failures.allowed("source", source) or (
            not service
            and not (
                self._user_failures.allowed("user", username)
                and self._user_sign_ins.allowed("user", username)
            )
        )
        if throttled:
            client_log.warning("sign-in of %r from %s refused: too many attempts", username, source)
            self.refused("throttled")
            return SERVER_UNAVAILABLE
        signed_in_with: str | None = None
        if service:
            ok = hmac.compare_digest(self.services[username].encode(), password.encode())
        elif credentials.is_credential(password):
            signed_in_with = await self._check_credential(username, client_id, password)
            ok = signed_in_with is not None
        else:
            try:
                signed_in_with = await asyncio.to_thread(self._authenticate, username, password)
            except signin.Busy:
                log.warning("sign-in of %r from %s refused: too many at once", username, source)
                self.refused("busy")
                return SERVER_UNAVAILABLE
            ok = signed_in_with is not None
        reason = "bad_credentials"
        if ok and not service and not acl.client_id_allowed(username, client_id):
            reason = "client_id"
            client_log.warning(
                "refused client id %r for %r: it must be %r or start with %r",
                client_id,
                username,
                username,
                username + ":",
            )
            ok = False
        if not ok:
            client_log.info("authentication failed for %r from %s", username, source)
            self.refused(reason)
            self._source_failures.hit("source", source)
            if not service:
                self._user_failures.hit("user", username)
            return NOT_AUTHORIZED
        if not service:
            self._user_sign_ins.hit("user", username)
        return Admitted(username, signed_in_with)

    def publish_allowed(self, username: str, topic: str, *, retain: bool) -> bool:
        """The publish ACL, retain flag included: for publishes and last wills alike."""
        if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
            return False  # not a topic one can publish to (MQTT-3.3.2-2, MQTT-4.7.2-1)
        service = username in self.services
        rules = acl.BRIDGE_RULES if service else acl.USER_RULES
        if not acl.allowed(rules, username, "publish", topic):
            return False
        return not retain or acl.retain_allowed(service)

    async def _check_credential(self, username: str, client_id: str, password: str) -> str | None:
        """The generation key of a credential valid for exactly this user and client id,
        issued under the account's current token generation; None otherwise.

        The HMAC comes first and costs microseconds: a forged, expired, malformed or
        oversized one never reaches the database.
        """
        if self._credential_secret is None:
            return None
        verified = credentials.verify(
            self._credential_secret, username, client_id, password, now=time.time()
        )
        if verified is None:
            return None
        current = await asyncio.to_thread(self._generation, username)
        if current != verified.generation:
            return None
        return generation_key(current)

    def _generation(self, username: str) -> int | None:
        with DbSession(self._engine) as db:
            return tokens.generation(db, username)

    def _authenticate(self, username: str, password: str) -> str | None:
        with DbSession(self._engine) as db:
            return accounts.authenticate(db, username, password)

    def current_sign_ins(self, usernames: list[str]) -> dict[str, set[str]]:
        """What a session of each enabled account among ``usernames`` may still be
        signed in with: its password hash and its current :func:`generation_key`.
        Blocking."""
        found: dict[str, set[str]] = {}
        with DbSession(self._engine) as db:
            # In chunks: SQLite and PostgreSQL bound the parameters of one statement.
            for start in range(0, len(usernames), 500):
                state = accounts.credentials_state(db, usernames[start : start + 500])
                found.update(
                    {name: {hash_, generation_key(gen)} for name, (hash_, gen) in state.items()}
                )
        return found


class _Rewindable(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no types
    """A reader that can hand amqtt again the bytes the gate already read."""

    def __init__(self, reader: ReaderAdapter) -> None:
        self._reader = reader
        self._recorded = bytearray()
        self._recording = True

    def rewind(self) -> None:
        self._recording = False

    async def read(self, n: int = -1) -> bytes:
        if self._recording:
            data: bytes = await self._reader.read(n)
            self._recorded += data
            return data
        if not self._recorded:
            return bytes(await self._reader.read(n))
        if n < 0:
            head = bytes(self._recorded)
            self._recorded.clear()
            return head + bytes(await self._reader.read(n))
        head = bytes(self._recorded[:n])
        del self._recorded[:n]
        if len(head) < n:
            head += bytes(await self._reader.read(n - len(head)))
        return head

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class MqchatBroker(Broker):  # type: ignore[misc]
    """amqtt with :class:`Gate` in front of it and a watch on the accounts table."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._engine = make_engine(settings.database_url)
        self.registry = new_registry()
        self.metrics = BrokerMetrics(
            self.registry,
            connections=self._connected_count,
            sessions=lambda: len(self._sessions),
            retained=lambda: len(self._retained_messages),
            queued=self._queued_count,
        )
        self.gate = Gate(settings, self._engine, self.metrics.refused)
        super().__init__(broker_config(settings))
        # getattr: amqtt is untyped and mypy cannot infer the attribute before it is set.
        table = _SubscriptionTable(getattr(self, "_subscriptions"))  # noqa: B009
        self._subscriptions = table
        self._broadcast_queue = _BroadcastQueue(table, self.metrics.relayed.inc)
        self._watch_task: asyncio.Task[None] | None = None
        #: Handlers of connections whose persistent session a newer CONNECT with the
        #: same client id is taking over (see ``_handle_disconnect``).
        self._replaced: set[BrokerProtocolHandler] = set()

    async def start(self) -> None:
        await super().start()
        self._watch_task = asyncio.create_task(self._watch_accounts())

    def _connected_count(self) -> int:
        return sum(1 for s, _ in list(self._sessions.values()) if s.transitions.is_connected())

    def _queued_count(self) -> int:
        # amqtt keeps what waits for a disconnected session in ``retained_messages``.
        return sum(s.retained_messages.qsize() for s, _ in list(self._sessions.values()))

    def readiness_checks(self) -> dict[str, Check]:
        """The database the accounts are read from, and amqtt's listeners."""

        async def listening() -> str | None:
            return None if self.transitions.is_started() else "listeners not started"

        return {"listeners": listening, "database": database_check(self._engine)}

    def unfinished(self) -> str:
        """What a shutdown cut short would abandon: sessions not yet closed, messages
        not yet relayed (both as amqtt counts them)."""
        sessions = len(getattr(self, "_sessions"))  # noqa: B009
        return f"{sessions} client sessions, {self._broadcast_queue.qsize()} messages to relay"

    async def shutdown(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        try:
            await super().shutdown()
        finally:
            self.dispose()

    def dispose(self) -> None:
        """Close the database connections: also after a start or shutdown that failed."""
        self._engine.dispose()

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        peer = writer.get_peer_info()
        source = peer[0] if peer is not None else "unknown"
        # Counted on arrival, so connections that never send a CONNECT count too.
        allowed = self.gate.connection_allowed(source)
        guard = PacketGuard(reader, self.settings.max_packet_bytes)
        rewindable = _Rewindable(guard)
        try:
            connect = await asyncio.wait_for(
                read_connect(rewindable), self.settings.connect_timeout
            )
        except TimeoutError:
            client_log.info("no CONNECT from %s within %s s", source, self.settings.connect_timeout)
            self.metrics.refused("no_connect")
            await _close(writer)
            return
        except PacketRefused as refused:
            client_log.info("CONNECT from %s refused: %s", source, refused)
            self.metrics.refused("malformed")
            if refused.return_code is None:
                await _close(writer)
            else:
                await _refuse(writer, refused.return_code)
            return
        if not allowed:
            client_log.warning("connection from %s refused: over the connection rate", source)
            self.metrics.refused("connect_rate")
            await _refuse(writer, SERVER_UNAVAILABLE)
            return
        # amqtt stands a random id in for an empty one (client_id_is_random).
        if connect.payload.client_id_is_random and not connect.clean_session_flag:
            # MQTT 3.1.1 section 3.1.3.1, and what mosquitto answers, before any password.
            self.metrics.refused("identifier_rejected")
            await _refuse(writer, IDENTIFIER_REJECTED)
            return
        verdict = await self.gate.admit(
            source, connect.client_id or "", connect.username, connect.password
        )
        if not isinstance(verdict, Admitted):
            await _refuse(writer, verdict)
            return
        if connect.will_flag and not self.gate.publish_allowed(
            verdict.username, connect.will_topic or "", retain=bool(connect.will_retain_flag)
        ):
            # Refused now rather than dropped when it fires (as mosquitto 2.0.11 does):
            # the client learns of its mistake.
            client_log.warning(
                "refused CONNECT of %r from %s: a last will on %r%s is outside its ACL",
                verdict.username,
                source,
                connect.will_topic,
                " (retained)" if connect.will_retain_flag else "",
            )
            self.metrics.refused("will")
            await _refuse(writer, NOT_AUTHORIZED)
            return
        if verdict.signed_in_with is not None and not await self._make_room(
            verdict.username, connect.client_id or ""
        ):
            self.metrics.refused("sessions")
            await _refuse(writer, SERVER_UNAVAILABLE)
            return
        self.metrics.signins.inc()
        guard.keepalive = connect.keep_alive  # amqtt never enforces it (broker.wire)
        rewindable.rewind()
        _admitted.set(verdict)
        replaced = None
        if not connect.clean_session_flag:
            held = self._sessions.get(connect.client_id)
            if held is not None and held[0].transitions.is_connected():
                replaced = held[1]  # amqtt takes this session over from it, below
                self._replaced.add(replaced)
        try:
            await super()._client_connected(listener_name, rewindable, writer)
        finally:
            self._replaced.discard(replaced)

    async def _make_room(self, username: str, client_id: str) -> bool:
        """Whether ``username`` may hold one more session, after ending its oldest idle one.

        amqtt keeps a persistent session (about 27 KB, its subscriptions, and a queue of
        up to ``max_queued_messages``) for ``session_expiry``; without a bound a user could
        leave thousands (``alice:1`` ... ``alice:N``), each with a copy of every message
        addressed to them. ``client_id`` itself does not count: it resumes or replaces.
        """
        held = [
            session
            for cid, (session, _) in list(self._sessions.items())
            if session.username == username and cid != client_id
        ]
        if len(held) < self.settings.max_sessions_per_user:
            return True
        away = [s for s in held if not s.transitions.is_connected()]
        if not away:
            client_log.warning(
                "CONNECT of %r refused: %d sessions connected "
                "(MQCHAT_BROKER_MAX_SESSIONS_PER_USER)",
                username,
                len(held),
            )
            return False
        oldest = min(away, key=lambda s: s.last_disconnect_time or 0)
        client_log.warning(
            "session %r ended to make room for %r (MQCHAT_BROKER_MAX_SESSIONS_PER_USER)",
            oldest.client_id,
            client_id,
        )
        await self._delete_session(oldest.client_id)
        return True

    # -- amqtt's paths that skip the topic plugins -----------------------------------------

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's session set-up, with a handler that bounds unreleased QoS 2 messages."""
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        bounded = _BoundedHandler(self.plugins_manager, loop=getattr(handler, "_loop", None))
        bounded.max_unreleased = self.settings.max_unreleased_messages
        return bounded, session

    async def _handle_disconnect(
        self, client_session: Session, handler: Any, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        """Fire a last will only if it passes the publish ACL, retain flag included.

        amqtt 0.12.1 broadcasts and retains a will without asking the topic plugins, so a
        will was a way to publish as anyone. The gate refuses such a CONNECT already; this
        is the second look when the will fires (a persistent session keeps the will of the
        CONNECT that last resumed it).
        """
        if handler in self._replaced:
            # A newer CONNECT with this client id took the session over: it is that
            # connection's now, and only this connection ends. amqtt would fire the
            # session's will (the newer CONNECT's) and mark the session disconnected
            # under its new owner, and the next take-over then left the connection it
            # replaced open, with no session and no word (MQTT 3.1.1 section 3.1.4
            # says the server disconnects it).
            self._replaced.discard(handler)
            await self._stop_handler(handler)
            return
        if client_session.will_flag and not self.gate.publish_allowed(
            client_session.username or "",
            client_session.will_topic or "",
            retain=bool(client_session.will_retain),
        ):
            client_log.warning(
                "last will of %r on %r dropped: outside its ACL",
                client_session.client_id,
                client_session.will_topic,
            )
            client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """Drop a retained publish that its sender may not retain, as mosquitto does.

        The topic plugins never see the retain flag. The publish is acknowledged and
        dropped whole, like any publish outside the ACL, so both brokers answer alike.
        """
        message = wait_deliver.result()
        packet = getattr(message, "publish_packet", None)
        if (
            packet is not None
            and packet.retain_flag
            and not self.gate.publish_allowed(
                client_session.username or "", message.topic or "", retain=True
            )
        ):
            client_log.info(
                "retained publish of %r on %r dropped: it may not retain there",
                client_session.client_id,
                message.topic,
            )
            return True
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """Where amqtt stores (or clears) every retained message: only with the ACL's yes.

        ``source_session`` is None for the broker's own messages.
        """
        if source_session is not None and not self.gate.publish_allowed(
            source_session.username or "", topic_name or "", retain=True
        ):
            client_log.warning(
                "not retained: %r may not retain on %r", source_session.client_id, topic_name
            )
            return
        await super().retain_message(source_session, topic_name, data, qos)

    async def _handle_subscription(
        self, client_session: Session, handler: Any, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        token = _subscribing.set(True)
        try:
            await super()._handle_subscription(client_session, handler, subscribe_waiter)
        finally:
            _subscribing.reset(token)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Send the retained messages of a subscription just granted, that it may read.

        amqtt 0.12.1 also calls this on every CONNECT, once for every filter held by
        *anyone*, so a newcomer with no subscription got other users' retained messages,
        and connecting cost grew with the number of users. Only a SUBSCRIBE sends them
        now (MQTT-3.3.1-6: "when a new subscription is established"), and each one
        passes the read check (a subscription was checked as a filter; this checks
        the topic).
        """
        if not _subscribing.get():
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        topic_filter, qos = subscription
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            sends.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
            )
        await _sent(sends)

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        """Queue a message for a disconnected persistent session, up to a bound.

        amqtt 0.12.1 queued without limit for as long as a session is kept (30 days),
        so a session left subscribed grew the broker with every message to its user.
        Newer messages are dropped over ``max_queued_messages``, as mosquitto does; the
        history API has them.
        """
        if target_session.retained_messages.qsize() >= self.settings.max_queued_messages:
            client_log.warning(
                "queue of %r full (%d, MQCHAT_BROKER_MAX_QUEUED_MESSAGES): message dropped",
                target_session.client_id,
                self.settings.max_queued_messages,
            )
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliver what was queued for a persistent session while it was away.

        amqtt 0.12.1 sends these with the retain flag set, so a device took a queued chat
        message for a stored state. MQTT-3.3.1-9: a message sent because it matches an
        established subscription has retain 0, however it was published; mosquitto does
        the same.
        """
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            sends.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                )
            )
        await _sent(sends)

    async def drop_user(self, username: str) -> int:
        """End every session of ``username``: subscriptions, queue and connection.

        Returns:
            How many sessions were ended.
        """
        ended = 0
        for client_id, (session, handler) in list(self._sessions.items()):
            if session.username != username:
                continue
            connected = session.transitions.is_connected()
            # First out of the routing tables, so nothing more is delivered to it...
            await self._delete_session(client_id)
            if connected:
                # ...then the connection, through amqtt's path for a lost client
                # (the last will is published, so the bridge marks it offline).
                await handler.handle_connection_closed()
            ended += 1
        if ended:
            log.warning("dropped %d session(s) of %r", ended, username)
        return ended

    async def _watch_accounts(self) -> None:
        while True:
            await asyncio.sleep(self.settings.account_poll)
            signed_in: dict[str, set[str | None]] = {}
            for session, _ in list(self._sessions.values()):
                if session.username and session.username not in self.gate.services:
                    signed_in.setdefault(session.username, set()).add(
                        session.attributes.get(HASH_ATTRIBUTE)
                    )
            if not signed_in:
                continue
            try:
                current = await asyncio.to_thread(self.gate.current_sign_ins, sorted(signed_in))
            except SQLAlchemyError as exc:
                log.error("cannot check accounts: %s", exc)
                continue
            for username, keys in signed_in.items():
                if not keys <= current.get(username, set()):
                    await self.drop_user(username)


async def _sent(sends: list[asyncio.Future[Any]]) -> None:
    """Wait for publishes to a client and take their outcome.

    A client that never acknowledges makes each one fail with amqtt's PUBACK timeout,
    which amqtt has already logged (rate-limited, broker.lognoise). Left unretrieved,
    each also became asyncio's "Task exception was never retrieved" ERROR with a
    traceback, outside any rate limit. Anything else is ours, and is logged whole.
    """
    for outcome in await asyncio.gather(*sends, return_exceptions=True):
        if isinstance(outcome, Exception) and not isinstance(
            outcome, TimeoutError | OSError | AMQTTError
        ):
            log.error("a publish to a client failed", exc_info=outcome)


async def _refuse(writer: WriterAdapter, return_code: int) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        await ConnackPacket.build(0, return_code).to_stream(writer)
    await _close(writer)


async def _close(writer: WriterAdapter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        await writer.close()


class _BoundedHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's handler of one connection, holding a bounded number of QoS 2 messages.

    amqtt 0.12.1 keeps every QoS 2 PUBLISH until its PUBREL, keyed by packet id: a
    client that never sends PUBREL made it hold 65,535 messages of up to
    ``max_packet_bytes`` each (1,000 of 60 KB: +66 MB of RSS). One over
    ``max_unreleased`` closes the connection instead; a client that completes its
    flows never has more than a few in flight.
    """

    max_unreleased: int = 100

    async def handle_publish(self, publish_packet: Any) -> None:
        session = self.session
        if (
            session is not None
            and publish_packet.qos == 2
            and publish_packet.packet_id not in session.inflight_in
            and len(session.inflight_in) >= self.max_unreleased
        ):
            client_log.warning(
                "closed %r: over %d QoS 2 messages not released "
                "(MQCHAT_BROKER_MAX_UNRELEASED_MESSAGES)",
                session.client_id,
                self.max_unreleased,
            )
            await self.handle_connection_closed()
            return
        await super().handle_publish(publish_packet)


class AccountAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Lets in exactly what :class:`Gate` admitted for this connection."""

    async def authenticate(self, *, session: Session) -> bool | None:
        admitted = _admitted.get()
        if admitted is None or admitted.username != session.username:
            return False
        session.attributes[HASH_ATTRIBUTE] = admitted.signed_in_with
        return True


class TopicAcl(BaseTopicPlugin):  # type: ignore[misc]
    @dataclass
    class Config:
        #: usernames that get the bridge's rules instead of a user's.
        bridges: list[str] = field(default_factory=list)
        #: The per-user publish quota (broker/quota.py); rate 0 turns it off.
        publish_rate: float = 0.0
        publish_burst: int = 0

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._quota = quota.PublishQuota(
            self.config.publish_rate, self.config.publish_burst, self.config.bridges
        )

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or not session.username or topic is None:
            return False
        # Only new messages count: a device catching up acks every message it gets (a
        # backlog of hundreds at once), and acks, typing and presence have the bridge's
        # own cheap per-kind rates (MQCHAT_BRIDGE_UPLINK_RATE).
        if action == Action.PUBLISH and topic.endswith(QUOTA_SUFFIX):
            verdict = self._quota.admit(session.username)
            if verdict is quota.Verdict.DISCONNECT:
                quota.disconnect(self.context._broker_instance, session.client_id, session.username)
            if verdict is not quota.Verdict.RELAY:
                return False
        rules = acl.BRIDGE_RULES if session.username in self.config.bridges else acl.USER_RULES
        # RECEIVE: a topic delivered to the session must be one it may read (a filter it
        # may subscribe to covers it); the subscription was checked too, but retained
        # messages and queues reach a session by other paths.
        verb: acl.Action = "publish" if action == Action.PUBLISH else "subscribe"
        return acl.allowed(rules, session.username, verb, topic)


def listener_table(settings: BrokerSettings) -> dict[str, dict[str, Any]]:
    """amqtt's listener table: plain MQTT and WebSocket, and their TLS twins if configured.

    Every listener runs the same auth and ACL plugins, so switching transport gives
    a client nothing it did not have.
    """
    out: dict[str, dict[str, Any]] = {
        "default": {"type": "tcp", "bind": f"{settings.host}:{settings.port}"},
    }
    if settings.ws_port:
        out["ws"] = {"type": "ws", "bind": f"{settings.host}:{settings.ws_port}"}
    if settings.tls:
        host = settings.tls_host or settings.host
        tls = {"ssl": True, "certfile": settings.tls_certfile, "keyfile": settings.tls_keyfile}
        if settings.tls_port:
            out["tls"] = {"type": "tcp", "bind": f"{host}:{settings.tls_port}", **tls}
        if settings.wss_port:
            out["wss"] = {"type": "ws", "bind": f"{host}:{settings.wss_port}", **tls}
    return out


def broker_config(settings: BrokerSettings) -> dict[str, Any]:
    return {
        "listeners": listener_table(settings),
        "session_expiry_interval": settings.session_expiry,
        "plugins": {
            f"{__name__}.AccountAuth": {},
            f"{__name__}.TopicAcl": {
                "bridges": [settings.bridge_username],
                "publish_rate": settings.publish_rate,
                "publish_burst": settings.publish_burst,
            },
        },
    }


class _SubscriptionTable(dict[str, list[tuple[Any, int]]]):
    """amqtt's subscription table, indexed by topic filter and iterated over a snapshot.

    Index: amqtt 0.12.1 walks every filter of the table for every message it relays
    (``_run_broadcast``: a match and a debug string per filter), so with 1,000 users,
    each subscribed to its own ``down/#``, one chat message cost the broker about 4,000
    filter checks and the embedded stack fell behind at 100 msg/s. The table keeps the
    filters in a topic trie too (:class:`TopicIndex`); the broadcast queue tells it the
    topic being relayed (:class:`_BroadcastQueue`), and ``items()`` then hands amqtt only
    the filters that can match it. amqtt still checks each of them itself.

    Snapshot: amqtt walks the table while awaiting (the ACL check of each subscriber,
    retained messages on connect). A client subscribing or leaving meanwhile changed it
    under the walk: ``RuntimeError: dictionary changed size during iteration``, and that
    broadcast reached no one. So iteration goes over a copy.
    """

    def __init__(self, table: dict[str, list[tuple[Any, int]]]) -> None:
        super().__init__(table)
        self._index = TopicIndex(table)
        #: The topic of the broadcast amqtt is about to relay (set by its queue).
        self.relaying: str | None = None

    def __setitem__(self, topic_filter: str, subscriptions: list[tuple[Any, int]]) -> None:
        super().__setitem__(topic_filter, subscriptions)
        self._index.add(topic_filter)

    def __delitem__(self, topic_filter: str) -> None:
        super().__delitem__(topic_filter)
        self._index.discard(topic_filter)

    def clear(self) -> None:
        super().clear()
        self._index = TopicIndex()

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> Any:
        topic, self.relaying = self.relaying, None
        if topic is None:
            return [(f, list(subs)) for f, subs in super().items()]
        # The trie holds exactly the table's filters, so each one it yields is a key.
        return [(f, list(self[f])) for f in self._index.matching(topic)]


class _BroadcastQueue(asyncio.Queue[dict[str, Any]]):
    """amqtt's queue of messages to relay; tells the table which topic comes next."""

    def __init__(self, table: _SubscriptionTable, relayed: Callable[[], None]) -> None:
        super().__init__()
        self._table = table
        self._relayed = relayed

    async def get(self) -> dict[str, Any]:
        broadcast = await super().get()
        self._relayed()
        # amqtt reads the table right after this, before it awaits anything.
        self._table.relaying = broadcast.get("topic")
        return broadcast
