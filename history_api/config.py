"""Settings of the history API, read once from ``MQCHAT_API_*`` variables."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from limits import parse_many
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core import daemon
from core.endpoints import AllowHosts, Allowlist
from store.presence import DEFAULT_GROUP_LIMIT, GROUP_LIMIT_VARIABLE
from store.signin import SIGN_IN_BURST, SIGN_INS_PER_SECOND


class ApiSettings(BaseSettings):
    # validate_by_name: see BridgeSettings.
    model_config = SettingsConfigDict(
        env_prefix="MQCHAT_API_", extra="ignore", validate_by_name=True
    )

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
    #: Turns on the answers to a RabbitMQ cluster's HTTP auth backend
    #: (``history_api/broker_auth.py``), under ``/broker-auth/<this secret>/``; also
    #: refuses usernames with ``.`` at sign-up (a topic level separator there).
    broker_auth_secret: SecretStr | None = None
    #: Seconds requests in flight get to finish on SIGTERM; then uvicorn cancels them
    #: (and logs how many) and the API exits.
    shutdown_timeout: int = Field(default=10, ge=1)
    #: How long a bearer token from ``POST /v1/tokens`` stays valid: seconds
    #: (``86400``) or ISO 8601 (``PT24H``).
    token_ttl: timedelta = Field(default=timedelta(hours=24), gt=timedelta(0))
    #: The key MQTT credentials (``POST /v1/mqtt-credentials``) are signed with; the
    #: broker checks them with the same one (``MQCHAT_BROKER_MQTT_CREDENTIAL_SECRET``,
    #: mosquitto's ``plugin_opt_credential_key_file``). Unset: no credentials issued.
    mqtt_credential_secret: SecretStr | None = None
    #: How long an MQTT credential lets a device connect: seconds or ISO 8601. A device
    #: fetches a new one whenever it (re)connects, so minutes are enough.
    mqtt_credential_ttl: timedelta = Field(default=timedelta(minutes=15), ge=timedelta(seconds=1))

    #: HTTPS: the server certificate (PEM, intermediates after it) and its key. Both
    #: or neither; uvicorn reads them at startup, so restart after renewing.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        daemon.check_tls_pair(type(self), self.tls_certfile, self.tls_keyfile)
        return self

    #: Failed sign-ins (``POST /v1/tokens``, and wrong current passwords) one account
    #: may have before it is refused with 429 for a while, even with the right
    #: password; ``limits`` rate strings (moving windows). Successes never count.
    login_failures_per_user: str = "10/minute;100/hour"
    #: Failed sign-ins from one client address, for any accounts. Behind a reverse
    #: proxy every client has the proxy's address: see docs/security.md.
    login_failures_per_source: str = "30/minute;300/hour"
    #: Successful sign-ins (``POST /v1/tokens``) one account may make; above it 429
    #: until the window has room. Each costs a database write (the token) and, without
    #: the verified-credentials cache, an argon2 hash: 40 clients signing in over and
    #: over held other users' requests for seconds. Room for every device of a user
    #: signing in at once.
    sign_ins_per_user: str = "30/minute;300/hour"
    #: Sign-ins this process admits a second, and at once (``store.signin``); above it
    #: 429 with ``Retry-After``. Cache hits count too.
    sign_ins_per_second: float = Field(default=SIGN_INS_PER_SECOND, gt=0)
    sign_in_burst: int = Field(default=SIGN_IN_BURST, ge=1)
    #: Sign-ins (password check and token write) running at once on worker threads;
    #: the others wait their turn on the event loop, where waiting costs nothing.
    #: Each one running competes with every other request for the interpreter: 20 at
    #: once raised other users' ``GET /v1/conversations`` p99 about 5x
    #: (docs/benchmarks.md, "Correct sign-ins in bulk").
    sign_in_threads: int = Field(default=2, ge=1)
    #: Groups up to this many members make their members each other's contacts, whose
    #: presence ``GET /v1/users/{name}/presence`` tells: ``MQCHAT_PRESENCE_GROUP_LIMIT``,
    #: the bridge's too.
    presence_group_limit: int = Field(
        default=DEFAULT_GROUP_LIMIT, ge=0, validation_alias=GROUP_LIMIT_VARIABLE
    )

    @model_validator(mode="after")
    def _rates_parse(self) -> ApiSettings:
        parse_many(self.login_failures_per_user)  # ValueError names what is wrong
        parse_many(self.login_failures_per_source)
        parse_many(self.sign_ins_per_user)
        return self

    #: Browser origins (``https://app.example.com``) whose scripts may call the API
    #: and read its answers (CORS), comma-separated; ``*`` for any. None by default:
    #: a page on another origin cannot read a token it was issued.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for origin in value:
                if origin != "*" and not _is_origin(origin):
                    raise ValueError(
                        f"{origin!r} is not an origin: scheme://host[:port], no path or '/'"
                    )
        return value

    #: The built web app (``clients/js/dist/site``, ``make web``), served at ``/``
    #: same-origin with the API; None serves none. ``mqchat up`` sets it.
    web_dir: Path | None = None
    #: Where the web app connects to MQTT over WebSocket; ``{host}`` becomes the host
    #: the page was loaded from, so a browser on another machine finds the broker too.
    web_mqtt_url: str = "ws://{host}:8083/mqtt"
    #: Hosts and networks (``push.internal,10.1.0.0/16``) that push endpoints may
    #: resolve into although they are not public; the push daemon's
    #: ``MQCHAT_PUSH_ALLOW_HOSTS`` must name them too. Empty by default.
    push_allow_hosts: AllowHosts = Field(default_factory=list)

    @property
    def push_allowlist(self) -> Allowlist:
        return Allowlist.parse(self.push_allow_hosts)

    @property
    def provisions_mosquitto(self) -> bool:
        return self.mosquitto_admin_password is not None


def _is_origin(text: object) -> bool:
    """Whether ``text`` is what a browser sends in ``Origin``: an origin matches exactly,
    so ``https://app.example/`` (a trailing slash) would never match and fail silently."""
    if not isinstance(text, str):
        return False
    parts = urlsplit(text)
    return (
        parts.scheme in {"http", "https"}
        and bool(parts.netloc)
        and not (parts.path or parts.query or parts.fragment)
        and text == f"{parts.scheme}://{parts.netloc}"
    )
