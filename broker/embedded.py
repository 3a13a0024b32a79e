"""The embedded broker: amqtt with mqchat's authentication and topic ACL.

amqtt speaks MQTT 3.1.1 only and keeps sessions in memory. Two plugins make it
enforce the same rules as the production mosquitto:

* :class:`AccountAuth` checks username and password against the accounts table
  (argon2, off the event loop) and the bridge's service credentials from settings.
  It also binds a client id to the first username that used it: amqtt hands an
  existing persistent session to whoever presents its client id, and would
  otherwise give another user alice's queued messages.
* :class:`TopicAcl` applies ``protocol.acl`` to every publish and subscribe.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from sqlalchemy import Engine
from sqlmodel import Session as DbSession

from protocol import acl
from store import accounts, make_engine

from .config import BrokerSettings

log = logging.getLogger(__name__)


class AccountAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no types
    @dataclass
    class Config:
        database_url: str = ""
        #: username -> password of service accounts (the bridge).
        services: dict[str, str] = field(default_factory=dict)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._engine: Engine = make_engine(self.config.database_url)
        self._client_owner: dict[str, str] = {}

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password = session.username, session.password
        if not username or password is None:
            return False
        expected = self.config.services.get(username)
        if expected is not None:
            ok = hmac.compare_digest(expected.encode(), password.encode())
        else:
            ok = await asyncio.to_thread(self._verify, username, password)
        if not ok:
            log.info("authentication failed for %r", username)
            return False
        client_id = session.client_id or ""
        owner = self._client_owner.setdefault(client_id, username) if client_id else username
        if owner != username:
            log.warning("%r tried to use client id %r of %r", username, client_id, owner)
            return False
        return True

    def _verify(self, username: str, password: str) -> bool:
        with DbSession(self._engine) as db:
            return accounts.verify(db, username, password)

    async def close(self) -> None:
        self._engine.dispose()


class TopicAcl(BaseTopicPlugin):  # type: ignore[misc]
    @dataclass
    class Config:
        #: usernames that get the bridge's rules instead of a user's.
        bridges: list[str] = field(default_factory=list)

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
    bridge_user = settings.bridge_username
    return {
        "listeners": listener_table(settings),
        "session_expiry_interval": settings.session_expiry,
        "plugins": {
            f"{__name__}.AccountAuth": {
                "database_url": settings.database_url,
                "services": {bridge_user: settings.bridge_password.get_secret_value()},
            },
            f"{__name__}.TopicAcl": {"bridges": [bridge_user]},
        },
    }


class _SubscriptionTable(dict[str, list[tuple[Any, int]]]):
    """amqtt's subscription table, iterated over a snapshot.

    amqtt 0.12.1 walks the table while awaiting (the ACL check of each subscriber in
    ``_run_broadcast``, retained messages on connect). A client subscribing or leaving
    meanwhile changed it under the walk: ``RuntimeError: dictionary changed size
    during iteration``, and that broadcast reached no one. A snapshot costs one copy
    of the table per broadcast; amqtt already matches every filter per broadcast.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> Any:
        return [(topic_filter, list(subs)) for topic_filter, subs in super().items()]


async def serve(settings: BrokerSettings, stop: asyncio.Event) -> None:
    """Run the broker until ``stop`` is set."""
    broker = Broker(broker_config(settings))
    broker._subscriptions = _SubscriptionTable(broker._subscriptions)
    await broker.start()
    log.info(
        "embedded broker listening on %s:%s (ws %s)",
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
