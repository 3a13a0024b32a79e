"""Settings of the embedded broker, read once from ``MQCHAT_BROKER_*`` variables."""

from __future__ import annotations

from pathlib import Path

from limits import parse_many
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core import daemon
from store.signin import SIGN_IN_BURST, SIGN_INS_PER_SECOND


class BrokerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MQCHAT_BROKER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    #: MQTT over WebSocket (for browsers); 0 turns the listener off.
    ws_port: int = Field(default=8083, ge=0, le=65535)
    #: Accounts are read from here (the same database the bridge writes).
    database_url: str
    bridge_username: str = "mqchat-bridge"
    #: No default: a service password that ships in the code is everyone's password.
    bridge_password: SecretStr
    #: The key MQTT credentials are checked with (``core.credentials``): the history
    #: API's ``MQCHAT_API_MQTT_CREDENTIAL_SECRET``. Unset: only passwords sign in.
    mqtt_credential_secret: SecretStr | None = None
    #: Seconds amqtt gets to close every session on SIGTERM; then what is left is
    #: abandoned (and logged), and the broker exits.
    shutdown_timeout: float = Field(default=10.0, gt=0)
    #: Seconds a disconnected persistent session (and its queue) is kept.
    session_expiry: int = 30 * 24 * 3600
    #: The server certificate (PEM, with any intermediates after it) and its private
    #: key. Setting both turns on the TLS listeners below; the plain ones stay (keep
    #: them on loopback, for the bridge, or turn ``ws_port`` off).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    #: Where the TLS listeners bind; by default the same interface as the plain ones.
    tls_host: str | None = None
    #: MQTT over TLS; 0 turns it off.
    tls_port: int = Field(default=8883, ge=0, le=65535)
    #: MQTT over WebSocket over TLS (``wss://``); 0 turns it off.
    wss_port: int = Field(default=8084, ge=0, le=65535)

    #: ``host:port`` of the listener for ``/metrics``, ``/livez`` and ``/readyz``
    #: (``core.metrics``); unset: none, like the bridge's. ``mqchat up`` turns it on.
    metrics_addr: str | None = None

    @field_validator("metrics_addr")
    @classmethod
    def _addr_parses(cls, value: str | None) -> str | None:
        if value is not None:
            daemon.parse_addr(value)  # ValueError names what is wrong
        return value

    @field_validator("bridge_password")
    @classmethod
    def _password_given(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("the bridge's password may not be empty")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> BrokerSettings:
        daemon.check_tls_pair(type(self), self.tls_certfile, self.tls_keyfile)
        return self

    @property
    def tls(self) -> bool:
        return self.tls_certfile is not None

    #: New connections one source address may open (``limits`` rate strings, moving
    #: windows); above it the CONNECT is answered 3 (server unavailable).
    connect_rate: str = "20/second;300/minute"
    #: Failed sign-ins one username may have before it is refused for a while, even
    #: with the right password (CONNACK 3). Service accounts are exempt: a guesser
    #: must not be able to lock the bridge out.
    auth_failures_per_user: str = "10/minute;100/hour"
    #: Failed sign-ins one source address may have, for any usernames.
    auth_failures_per_source: str = "30/minute;300/hour"
    #: Successful sign-ins one username may make (service accounts exempt); above it
    #: CONNACK 3 until the window has room. Room for every device of a user at once;
    #: a client reconnecting in a loop is refused.
    sign_ins_per_user: str = "30/minute;300/hour"
    #: Sign-ins this process admits a second, and at once (``store.signin``); above it
    #: CONNACK 3. Spreads a reconnect storm out; cache hits count too.
    sign_ins_per_second: float = Field(default=SIGN_INS_PER_SECOND, gt=0)
    sign_in_burst: int = Field(default=SIGN_IN_BURST, ge=1)
    #: Seconds between checks for disabled or deleted accounts and changed passwords;
    #: their live connections are dropped at the next check.
    account_poll: float = Field(default=2.0, gt=0)
    #: Seconds a new connection has to send its CONNECT.
    connect_timeout: float = Field(default=10.0, gt=0)
    #: The largest packet a client may send, counted as its remaining length (all but
    #: the 2-5 bytes of fixed header); a larger one closes the connection before its
    #: body is read. The default lets through every publish mosquitto.conf accepts: a
    #: payload of message_size_limit (65,536) with a topic of the longest length MQTT
    #: allows (2 + 65,535) and a packet id (2).
    max_packet_bytes: int = Field(default=131_075, ge=1024, le=268_435_455)
    #: Sessions (client ids) one user may hold, connected or kept while away. A CONNECT
    #: with a new client id beyond it ends the user's longest-disconnected session, or
    #: is refused (CONNACK 3) if all are connected. Service accounts are exempt.
    max_sessions_per_user: int = Field(default=32, ge=1)
    #: Messages queued for one disconnected persistent session; newer ones are dropped
    #: (the history API has them), as mosquitto.conf's max_queued_messages does.
    #: amqtt 0.12.1 queued without limit, for as long as session_expiry.
    max_queued_messages: int = Field(default=10_000, ge=1)
    #: QoS 2 messages one session may have received and not yet released (its PUBREL);
    #: one more closes the connection. amqtt 0.12.1 kept every one, up to 65,535 per
    #: connection of up to max_packet_bytes each; mosquitto.conf's max_inflight_messages
    #: (100) bounds the same on mosquitto.
    max_unreleased_messages: int = Field(default=100, ge=1, le=65_535)
    #: Seconds during which one log line per kind of client misbehaviour is written
    #: (a PUBACK never sent, a refused CONNECT, ...); the next says how many were left
    #: out. 0 writes every one. Tracebacks of client-caused errors are never written.
    client_log_interval: float = Field(default=10.0, ge=0)
    #: Messages (``up/msg`` publishes) a second one user may keep up, over all their connections
    #: (``broker/quota.py``); above it publishes are dropped at the broker, and a user
    #: who keeps sending over twice this is disconnected. Far above the bridge's own
    #: rates, so only a flood meets it. 0 turns it off.
    publish_rate: float = Field(default=100.0, ge=0)
    #: Publishes one user may send at once before the rate applies, and refused
    #: publishes it may pile up before it is disconnected.
    publish_burst: int = Field(default=50, ge=1)

    @model_validator(mode="after")
    def _rates_parse(self) -> BrokerSettings:
        rates_settings = (
            self.connect_rate,
            self.auth_failures_per_user,
            self.auth_failures_per_source,
            self.sign_ins_per_user,
        )
        for rates in rates_settings:
            parse_many(rates)  # ValueError names what is wrong
        return self
