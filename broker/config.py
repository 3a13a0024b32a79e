"""Settings of the embedded broker, read once from ``MQCHAT_BROKER_*`` variables."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class BrokerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MQCHAT_BROKER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 1883
    #: MQTT over WebSocket (for browsers); 0 turns the listener off.
    ws_port: int = 8083
    #: Accounts are read from here (the same database the bridge writes).
    database_url: str
    bridge_username: str = "mqchat-bridge"
    #: No default: a service password that ships in the code is everyone's password.
    bridge_password: SecretStr
    #: Seconds a disconnected persistent session (and its queue) is kept.
    session_expiry: int = 30 * 24 * 3600
