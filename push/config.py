"""Settings of the push daemon, read once from ``MQCHAT_PUSH_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.endpoints import AllowHosts, Allowlist


class PushSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MQCHAT_PUSH_", extra="ignore")

    #: The database the bridge writes: the push daemon reads its messages and cursors.
    database_url: str
    #: The VAPID private key (PEM), made on the first start if the file is not there,
    #: mode 0600. Every push daemon of a deployment needs the same one: browsers bind
    #: a subscription to the key it was made with.
    vapid_key_file: Path
    #: The ``sub`` claim of VAPID (RFC 8292): how a push service reaches the operator.
    vapid_subject: str = Field(
        default="mailto:postmaster@mqchat.invalid", pattern=r"^(mailto|https):"
    )
    #: Seconds a recipient's devices have to acknowledge a message as delivered
    #: before it is pushed. A recipient with no device online is pushed at once.
    grace: float = Field(default=3.0, ge=0)
    #: Seconds between two pushes of one conversation to one user: what comes in
    #: between goes into the next push, with its count (one notification per burst).
    collapse: float = Field(default=10.0, ge=0)
    #: Seconds between two looks at the database when there was nothing to do.
    poll: float = Field(default=0.2, gt=0)
    #: Most rows one database turn reads (messages scanned, bursts decided, pushes
    #: claimed).
    batch: int = Field(default=500, ge=1)
    #: Pushes sent at once.
    concurrency: int = Field(default=32, ge=1)
    #: Seconds a claimed push is this daemon's; after it, another daemon may send it
    #: (this one died holding it).
    lease: float = Field(default=120.0, gt=0)
    #: Seconds a missing message key is looked for (a transaction still open in
    #: another bridge) before it is taken for a rollback.
    gap_timeout: float = Field(default=30.0, gt=0)
    #: The Web Push ``TTL`` header: seconds the push service keeps an undelivered push.
    ttl: int = Field(default=86400, ge=0)
    urgency: Literal["very-low", "low", "normal", "high"] = "high"
    #: Seconds for one request to a push service, connecting and reading included.
    request_timeout: float = Field(default=10.0, gt=0)
    #: Most bytes of a push service's answer read; the rest is not waited for.
    max_response_bytes: int = Field(default=65536, ge=0)
    #: Tries per push (429, 5xx and network errors are tried again).
    max_attempts: int = Field(default=5, ge=1)
    #: The longest ``Retry-After`` honoured, in seconds; a longer one is cut to this.
    max_retry_after: float = Field(default=60.0, ge=0)
    #: Hosts and networks (comma-separated: ``push.internal,10.1.0.0/16``) that push
    #: endpoints may resolve into although they are not public. Empty by default.
    allow_hosts: AllowHosts = Field(default_factory=list)
    #: More CA certificates (PEM) trusted for push services, besides the system's.
    ca_file: Path | None = None
    #: Seconds to finish pushes in flight on SIGTERM.
    shutdown_timeout: float = 10.0
    #: Test only: the daemon kills itself (SIGKILL) right after committing its n-th
    #: round of push decisions, before sending any of them. Never set it in production.
    crash_after_decisions: int | None = Field(default=None, ge=1)

    @property
    def allowlist(self) -> Allowlist:
        return Allowlist.parse(self.allow_hosts)
