"""Settings of the history API, read once from ``MQCHAT_API_*`` variables."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MQCHAT_API_", extra="ignore")

    #: The same database the bridge writes and the broker reads accounts from.
    database_url: str
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: Where the production mosquitto listens. Only used when the admin password is
    #: set: mosquitto keeps its own account list, which the embedded broker does not.
    mosquitto_host: str = "127.0.0.1"
    mosquitto_port: int = Field(default=1883, ge=1, le=65535)
    mosquitto_admin_username: str = "mqchat-admin"
    mosquitto_admin_password: SecretStr | None = None
    #: How long a bearer token from ``POST /v1/tokens`` stays valid: seconds
    #: (``86400``) or ISO 8601 (``PT24H``).
    token_ttl: timedelta = Field(default=timedelta(hours=24), gt=timedelta(0))

    @property
    def provisions_mosquitto(self) -> bool:
        return self.mosquitto_admin_password is not None
