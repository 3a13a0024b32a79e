"""The embedded broker: amqtt with mqchat's sign-in gate and topic ACL.

amqtt speaks MQTT 3.1.1 only and keeps sessions in memory. mqchat adds::

    TCP/WS accept ──▶ MqchatBroker._client_connected
                        connect rate per source ──(over)──▶ CONNACK 3, close
                        read the CONNECT (bounded in time)
                        Gate.admit: throttles, password (argon2), client id rule
                            └─(refused)──▶ CONNACK 5 (or 3 while throttled), close;
                                           amqtt never sees it: no session is touched
                        amqtt's own handling, replaying the CONNECT
                            └─▶ AccountAuth.authenticate: only what the gate admitted
                        TopicAcl: a publish quota per user (quota.py), then
                                  protocol.acl on every publish and subscribe
    every account_poll s: accounts disabled, deleted or with a new password
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session as DbSession

from protocol import acl
from store import accounts, make_engine, signin

from . import READY_LOG, quota
from .config import BrokerSettings
from .throttle import Throttle
from .topic_index import TopicIndex

log = logging.getLogger(__name__)

#: CONNACK return codes of MQTT 3.1.1 that the gate answers with.
IDENTIFIER_REJECTED: Final = 0x02  # empty client id on a persistent session
SERVER_UNAVAILABLE: Final = 0x03  # throttled: try again later
NOT_AUTHORIZED: Final = 0x05  # wrong credentials, or another user's client id

#: Where the password hash an account signed in with is kept on its amqtt session.
HASH_ATTRIBUTE: Final = "mqchat_password_hash"


@dataclass(frozen=True, slots=True)
class Admitted:
    username: str
    #: The account's password hash at sign-in; None for service accounts.
    password_hash: str | None


#: Set by the gate for the task that hands an admitted connection to amqtt; amqtt
#: calls the auth plugin inside that task (or a task made from it).
_admitted: contextvars.ContextVar[Admitted | None] = contextvars.ContextVar(
    "mqchat_admitted", default=None
)


class Gate:
    """Who may connect, decided from the CONNECT alone, before amqtt acts on it."""

    def __init__(self, settings: BrokerSettings, engine: Engine) -> None:
        self._engine = engine
        self.services = {settings.bridge_username: settings.bridge_password.get_secret_value()}
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
            log.warning("sign-in of %r from %s refused: too many attempts", username, source)
            return SERVER_UNAVAILABLE
        password_hash: str | None = None
        if service:
            ok = hmac.compare_digest(self.services[username].encode(), password.encode())
        else:
            try:
                password_hash = await asyncio.to_thread(self._authenticate, username, password)
            except signin.Busy:
                log.warning("sign-in of %r from %s refused: too many at once", username, source)
                return SERVER_UNAVAILABLE
            ok = password_hash is not None
        if ok and not service and not acl.client_id_allowed(username, client_id):
            log.warning(
                "refused client id %r for %r: it must be %r or start with %r",
                client_id,
                username,
                username,
                username + ":",
            )
            ok = False
        if not ok:
            log.info("authentication failed for %r from %s", username, source)
            self._source_failures.hit("source", source)
            if not service:
                self._user_failures.hit("user", username)
            return NOT_AUTHORIZED
        if not service:
            self._user_sign_ins.hit("user", username)
        return Admitted(username, password_hash)

    def _authenticate(self, username: str, password: str) -> str | None:
        with DbSession(self._engine) as db:
            return accounts.authenticate(db, username, password)

    def current_hashes(self, usernames: list[str]) -> dict[str, str]:
        """Password hash of each enabled account among ``usernames``. Blocking."""
        found: dict[str, str] = {}
        with DbSession(self._engine) as db:
            # In chunks: SQLite and PostgreSQL bound the parameters of one statement.
            for start in range(0, len(usernames), 500):
                found.update(accounts.credentials_state(db, usernames[start : start + 500]))
                db.rollback()  # do not hold SQLite's write lock across chunks
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
        self.gate = Gate(settings, self._engine)
        super().__init__(broker_config(settings))
        # getattr: amqtt is untyped and mypy cannot infer the attribute before it is set.
        table = _SubscriptionTable(getattr(self, "_subscriptions"))  # noqa: B009
        self._subscriptions = table
        self._broadcast_queue = _BroadcastQueue(table)
        self._watch_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._watch_task = asyncio.create_task(self._watch_accounts())

    async def shutdown(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        try:
            await super().shutdown()
        finally:
            self._engine.dispose()

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        peer = writer.get_peer_info()
        source = peer[0] if peer is not None else "unknown"
        # Counted on arrival, so connections that never send a CONNECT count too.
        allowed = self.gate.connection_allowed(source)
        rewindable = _Rewindable(reader)
        try:
            connect = await asyncio.wait_for(
                ConnectPacket.from_stream(rewindable), self.settings.connect_timeout
            )
        except (TimeoutError, AMQTTError, MQTTError, NoDataError, OSError, ValueError) as exc:
            log.info("no valid CONNECT from %s: %s", source, exc or type(exc).__name__)
            await _close(writer)
            return
        if not allowed:
            log.warning("connection from %s refused: over the connection rate", source)
            await _refuse(writer, SERVER_UNAVAILABLE)
            return
        # amqtt stands a random id in for an empty one (client_id_is_random).
        if connect.payload.client_id_is_random and not connect.clean_session_flag:
            # MQTT 3.1.1 section 3.1.3.1, and what mosquitto answers, before any password.
            await _refuse(writer, IDENTIFIER_REJECTED)
            return
        verdict = await self.gate.admit(
            source, connect.client_id or "", connect.username, connect.password
        )
        if not isinstance(verdict, Admitted):
            await _refuse(writer, verdict)
            return
        rewindable.rewind()
        _admitted.set(verdict)
        await super()._client_connected(listener_name, rewindable, writer)

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
                current = await asyncio.to_thread(self.gate.current_hashes, sorted(signed_in))
            except SQLAlchemyError as exc:
                log.error("cannot check accounts: %s", exc)
                continue
            for username, hashes in signed_in.items():
                if hashes != {current.get(username)}:
                    await self.drop_user(username)


async def _refuse(writer: WriterAdapter, return_code: int) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        await ConnackPacket.build(0, return_code).to_stream(writer)
    await _close(writer)


async def _close(writer: WriterAdapter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        await writer.close()


class AccountAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Lets in exactly what :class:`Gate` admitted for this connection."""

    async def authenticate(self, *, session: Session) -> bool | None:
        admitted = _admitted.get()
        if admitted is None or admitted.username != session.username:
            return False
        session.attributes[HASH_ATTRIBUTE] = admitted.password_hash
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
        if action == Action.RECEIVE:
            return True  # what a client receives was checked when it subscribed
        if session is None or not session.username or topic is None:
            return False
        if action == Action.PUBLISH:
            verdict = self._quota.admit(session.username)
            if verdict is quota.Verdict.DISCONNECT:
                quota.disconnect(self.context._broker_instance, session.client_id, session.username)
            if verdict is not quota.Verdict.RELAY:
                return False
        rules = acl.BRIDGE_RULES if session.username in self.config.bridges else acl.USER_RULES
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

    def __init__(self, table: _SubscriptionTable) -> None:
        super().__init__()
        self._table = table

    async def get(self) -> dict[str, Any]:
        broadcast = await super().get()
        # amqtt reads the table right after this, before it awaits anything.
        self._table.relaying = broadcast.get("topic")
        return broadcast


async def serve(settings: BrokerSettings, stop: asyncio.Event) -> None:
    """Run the broker until ``stop`` is set."""
    broker = MqchatBroker(settings)
    await broker.start()
    log.info(
        "%s %s:%s (ws %s)",
        READY_LOG,
        settings.host,
        settings.port,
        settings.ws_port or "off",
    )
    if settings.tls:
        log.info(
            "TLS listeners on %s: mqtts %s, wss %s",
            settings.tls_host or settings.host,
            settings.tls_port or "off",
            settings.wss_port or "off",
        )
    try:
        await stop.wait()
    finally:
        await broker.shutdown()
