"""MQTT credentials: short-lived passwords a device signs in to the broker with.

A browser must not keep the account password, and MQTT knows no bearer token. So the
history API (``POST /v1/mqtt-credentials``, for a bearer token) signs a statement
"``username`` may connect as ``client_id`` until ``expires``, under token generation
``generation``" with a server secret, and the device sends it as its MQTT password::

    mqc1.<expires>.<issued>.<generation>.<hmac>

``expires`` and ``issued`` are Unix seconds, ``generation`` the account's
``token_generation`` (raised by every revocation of its tokens: password change,
disable, delete) and ``hmac`` the lowercase hex HMAC-SHA256, under the secret, of::

    mqc1 \\n username \\n client_id \\n expires \\n issued \\n generation

Usernames hold no newline and the three numbers only digits, so no two statements
share a text. Nothing is stored: a broker checks one HMAC (microseconds, no argon2,
no sign-in throttle spent on hashing) and the account's generation. The embedded
broker reads that from the database; mosquitto's plugin
(``broker/mosquitto_clientid/clientid_bind.c``, which implements this same format in
C with OpenSSL) is told of revocations by the API over ``$CONTROL/mqchat/v1`` and
refuses credentials issued before it started (a restart forgets what it was told).

Passwords that start with :data:`PREFIX` are credentials and nothing else: the
password policy refuses them for accounts (``store.accounts.check_password``), so a
malformed one is refused at once, never hashed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from store.accounts import CREDENTIAL_PREFIX

#: What every credential starts with; the version of the format.
PREFIX: Final = CREDENTIAL_PREFIX
#: No credential is longer: a longer password with the prefix is refused unread.
MAX_CHARS: Final = 128
_FORMAT: Final = re.compile(r"mqc1\.([0-9]{1,12})\.([0-9]{1,12})\.([0-9]{1,10})\.([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class Credential:
    """A credential as issued: the MQTT password and when it stops working."""

    password: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Verified:
    """What a genuine, unexpired credential states."""

    generation: int
    issued: int


def is_credential(password: str) -> bool:
    """Whether ``password`` is meant as a credential (and must be checked as one only)."""
    return password.startswith(PREFIX)


def _mac(secret: bytes, username: str, client_id: str, expires: str, issued: str, gen: str) -> str:
    statement = "\n".join(("mqc1", username, client_id, expires, issued, gen))
    return hmac.new(secret, statement.encode(), hashlib.sha256).hexdigest()


def issue(
    secret: bytes,
    username: str,
    client_id: str,
    generation: int,
    ttl: timedelta,
    *,
    now: datetime | None = None,
) -> Credential:
    """Sign a credential for ``username`` connecting as ``client_id``, valid for ``ttl``."""
    now = now if now is not None else datetime.now(UTC)
    issued = int(now.timestamp())
    expires = issued + max(1, int(ttl.total_seconds()))
    fields = (str(expires), str(issued), str(generation))
    mac = _mac(secret, username, client_id, *fields)
    return Credential(
        password=f"mqc1.{'.'.join(fields)}.{mac}",
        expires_at=datetime.fromtimestamp(expires, UTC),
    )


def verify(
    secret: bytes, username: str, client_id: str, password: str, *, now: float
) -> Verified | None:
    """What ``password`` states if it is a genuine credential for exactly this
    ``username`` and ``client_id`` that has not expired at ``now`` (Unix seconds);
    None for anything else. Cheap whatever the input: the length is checked first."""
    if len(password) > MAX_CHARS:
        return None
    match = _FORMAT.fullmatch(password)
    if match is None:
        return None
    expires, issued, generation, mac = match.groups()
    expected = _mac(secret, username, client_id, expires, issued, generation)
    if not hmac.compare_digest(expected, mac) or int(expires) <= now:
        return None
    return Verified(generation=int(generation), issued=int(issued))
