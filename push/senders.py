"""How a decided push leaves: one :class:`Sender` per kind of push service.

::

    Sender ─┬─ WebPushSender   webpush, unifiedpush: RFC 8030 POST, RFC 8291 aes128gcm
            │                  payload, RFC 8292 VAPID; over httpcore, to vetted addresses
            └─ (FCM, APNs: docs/operations.md says what each would need)

A sender answers with what the service said (:class:`Delivery`) and raises
:class:`TryAgain` for what may pass (429, 5xx, the network); the daemon owns the
retrying, the counting and the logging, the same for every sender.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import http_ece
import httpcore
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02

from core.endpoints import Allowlist, EndpointRefused, VettedBackend, check_url
from store.push import Claimed, Outcome

#: Connections of one pool (``WebPushSender``): the sender's concurrency is split
#: into pools of at most this many.
_POOL_SIZE: Final = 8
#: VAPID tokens are made for this long; RFC 8292 allows up to 24 h.
_VAPID_SECONDS: Final = 12 * 3600


@dataclass(frozen=True, slots=True)
class Notification:
    """What the device is told: who wrote, where, how many; text only if opted in."""

    conversation: str
    sender: str
    seq: int
    count: int
    preview: str | None = None
    #: ``created`` / ``added``: the newest news is that ``sender`` made the user a
    #: member of the group ``conversation``.
    event: str | None = None

    def payload(self) -> bytes:
        body: dict[str, object] = {
            "v": 1,
            "conversation": self.conversation,
            "from": self.sender,
            "seq": self.seq,
            "count": self.count,
        }
        if self.event is not None:
            body["event"] = self.event
        if self.preview is not None:
            body["body"] = self.preview
        return json.dumps(body, separators=(",", ":")).encode()

    @property
    def topic(self) -> str:
        """The Web Push ``Topic`` (at most 32 base64url characters): one per
        conversation, so a newer push replaces an undelivered older one."""
        digest = hashlib.sha256(self.conversation.encode()).digest()[:24]
        return base64.urlsafe_b64encode(digest).decode()


@dataclass(frozen=True, slots=True)
class Delivery:
    """A push service's final answer: ``sent``, ``gone`` (404/410) or ``failed``."""

    outcome: Outcome
    detail: str


class TryAgain(Exception):
    """A failure that may pass: 429, 5xx, or the network. ``retry_after``: seconds
    the service asked for, if it did."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Sender(Protocol):
    """One kind of push service. ``send`` returns the final answer or raises
    :class:`TryAgain`; it never retries itself."""

    channels: tuple[str, ...]

    async def send(self, push: Claimed, notification: Notification) -> Delivery: ...

    async def close(self) -> None: ...


def load_vapid(path: Path) -> Vapid02:
    """The VAPID key at ``path``, made (mode 0600) if there is none: kept like the
    bridge's secret, in the data directory, never in the code or the database."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return Vapid02.from_file(str(path))
    vapid = Vapid02()
    vapid.generate_keys()
    with os.fdopen(fd, "wb") as f:
        f.write(vapid.private_pem())
    return vapid


def application_server_key(vapid: Vapid02) -> str:
    """The public key as browsers want it (``applicationServerKey``): base64url of
    the uncompressed point, no padding."""
    raw = vapid.public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class WebPushSender:
    """Web Push and UnifiedPush: the same encrypted POST to the endpoint."""

    channels: tuple[str, ...] = ("webpush", "unifiedpush")

    def __init__(
        self,
        vapid: Vapid02,
        subject: str,
        allow: Allowlist,
        *,
        ttl: int,
        urgency: str,
        timeout: float,
        max_response_bytes: int,
        ca_file: Path | None = None,
        connections: int = 32,
    ) -> None:
        self._vapid = vapid
        self._subject = subject
        self._key = application_server_key(vapid)
        self._ttl, self._urgency = ttl, urgency
        self._timeout, self._max_response = timeout, max_response_bytes
        self._tokens: dict[str, tuple[float, str]] = {}
        context = ssl.create_default_context()
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
        # httpcore, not httpx: it takes a network backend (the vetted one) and never
        # follows a redirect. Several small pools taken in turn rather than one: a pool
        # checks every one of its connections (``has_expired``, ``is_idle``) each time
        # it places a request, so one pool of 32 spent about half the daemon's CPU
        # choosing connections (docs/benchmarks.md, "Push when away").
        backend = VettedBackend(allow)
        sizes = [_POOL_SIZE] * (connections // _POOL_SIZE)
        if connections % _POOL_SIZE:
            sizes.append(connections % _POOL_SIZE)
        self._pools = [
            httpcore.AsyncConnectionPool(
                ssl_context=context, max_connections=size, network_backend=backend, retries=0
            )
            for size in sizes
        ]
        #: Requests under way in each pool: the next goes to the least busy.
        self._busy = [0] * len(self._pools)

    async def send(self, push: Claimed, notification: Notification) -> Delivery:
        try:
            check_url(push.endpoint)
            body = self._encrypt(push, notification.payload())
        except (EndpointRefused, ValueError) as exc:
            return Delivery("failed", f"refused: {exc}")
        headers = {
            "TTL": str(self._ttl),
            "Urgency": self._urgency,
            "Topic": notification.topic,
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self._authorization(push.endpoint),
        }
        timeouts = {name: self._timeout for name in ("connect", "read", "write", "pool")}
        started = time.monotonic()
        try:
            async with self._stream(
                "POST",
                push.endpoint,
                headers=list(headers.items()),
                content=body,
                extensions={"timeout": timeouts},
            ) as response:
                status = response.status
                retry_after = _retry_after(response.headers)
                await self._read_bounded(response, started)
        except EndpointRefused as exc:
            return Delivery("failed", f"refused: {exc}")
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise TryAgain(f"{type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            return Delivery("sent", str(status))
        if status in (404, 410):
            return Delivery("gone", str(status))
        if status == 429 or status >= 500:
            raise TryAgain(str(status), retry_after)
        return Delivery("failed", str(status))

    @contextlib.asynccontextmanager
    async def _stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[httpcore.Response]:
        index = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            async with self._pools[index].stream(*args, **kwargs) as response:
                yield response
        finally:
            self._busy[index] -= 1

    async def _read_bounded(self, response: httpcore.Response, started: float) -> None:
        """Read at most ``max_response_bytes`` of the answer, within the request's time."""
        read = 0
        async for chunk in response.aiter_stream():
            read += len(chunk)
            if read > self._max_response or time.monotonic() - started > self._timeout:
                break

    def _encrypt(self, push: Claimed, payload: bytes) -> bytes:
        encrypted: bytes = http_ece.encrypt(
            payload,
            salt=os.urandom(16),
            private_key=ec.generate_private_key(ec.SECP256R1()),
            dh=_b64(push.p256dh),
            auth_secret=_b64(push.auth),
            version="aes128gcm",
        )
        return encrypted

    def _authorization(self, endpoint: str) -> str:
        """``vapid t=<JWT>, k=<key>`` for the endpoint's origin, signed once per hour."""
        parts = urlsplit(endpoint)
        audience = f"{parts.scheme}://{parts.netloc}"
        now = time.time()
        cached = self._tokens.get(audience)
        if cached is not None and cached[0] - now > _VAPID_SECONDS - 3600:
            return cached[1]
        expires = now + _VAPID_SECONDS
        claims = {"aud": audience, "sub": self._subject, "exp": int(expires)}
        header: str = self._vapid.sign(claims)["Authorization"]
        if len(self._tokens) > 10_000:
            self._tokens.clear()
        self._tokens[audience] = (expires, header)
        return header

    async def close(self) -> None:
        for pool in self._pools:
            await pool.aclose()


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), if given."""
    for name, value in headers:
        if name.lower() != b"retry-after":
            continue
        text = value.decode("latin-1").strip()
        if text.isdigit():
            return float(text)
        try:
            return max(0.0, parsedate_to_datetime(text).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return None
