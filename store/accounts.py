"""Accounts: names, the password policy, argon2 verification, and an account's life.

A username is chosen by people but used by machines as a topic level, so it is
normalised before it is checked: NFKC (fullwidth ``U+FF41 a`` and the Kelvin sign
become ASCII) and then case folding (``Alice`` becomes ``alice``). What comes out must
match :data:`protocol.topics.USERNAME_RE`; anything else (Cyrillic ``U+0430 a``, ``+``, ``#``,
``/``, a leading ``$``) is refused with ``invalid_username``. Two spellings that
normalise to one name are one account, so the second registration gets
``username_taken``.

Life of an account: enabled -> disabled (can be enabled again) -> deleted. A deleted
account keeps its row with a password hash that no password matches, so the name is
never given to someone else: messages addressed to it, and its place in existing
conversations, must not pass to a newcomer.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from protocol import errors, topics

from . import signin
from .tables import Account

MIN_PASSWORD_CHARS: Final = 8
#: Bounds the work one request can cause: argon2 hashes the whole input.
MAX_PASSWORD_CHARS: Final = 1024
#: What MQTT credentials start with (``core.credentials``): no account password may,
#: so a broker checks such a password as a credential only, never with argon2.
CREDENTIAL_PREFIX: Final = "mqc1."
#: Stored instead of a hash for a deleted account: no password verifies against it.
DELETED_HASH: Final = "!deleted"

#: The passwords tried first by every guesser (the head of published leak lists), as
#: they compare after case folding. A short list on purpose: length does most of the
#: work, and a long list would mostly refuse people rather than attackers.
COMMON_PASSWORDS: Final = frozenset(
    {
        "password",
        "password1",
        "password123",
        "passw0rd",
        "12345678",
        "123456789",
        "1234567890",
        "0123456789",
        "11111111",
        "00000000",
        "87654321",
        "qwertyui",
        "qwerty123",
        "qwertyuiop",
        "1q2w3e4r",
        "1qaz2wsx",
        "iloveyou",
        "sunshine",
        "princess",
        "football",
        "baseball",
        "welcome1",
        "abcdefgh",
        "abcd1234",
        "letmein1",
        "trustno1",
        "superman",
        "starwars",
        "whatever",
        "dragon123",
        "monkey123",
        "changeme",
        "mqchat123",
    }
)


@lru_cache(maxsize=1)
def _hasher() -> PasswordHasher:
    return PasswordHasher()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Verifying against a throwaway hash for unknown users keeps the time of a
    # failed login the same whether or not the account exists.
    return _hasher().hash("not a real password")


def normalize_username(username: str) -> str:
    """The one spelling of a username: NFKC, case-folded, checked.

    Raises:
        ProtocolError: ``invalid_username`` if the result is not a valid name.
    """
    # Bound the work before normalising: NFKC can expand a character up to 18-fold.
    normalized = unicodedata.normalize("NFKC", username).casefold() if len(username) <= 64 else ""
    if not topics.is_valid_username(normalized):
        raise errors.ProtocolError(
            errors.INVALID_USERNAME,
            "a username is 2-32 characters: a-z, digits, '_' and '.', starting with a "
            "letter or digit (upper case and fullwidth letters are folded to these)",
        )
    return normalized


def check_username(username: str) -> None:
    """Refuse a name that is not already in its normal form."""
    if normalize_username(username) != username:
        raise errors.ProtocolError(
            errors.INVALID_USERNAME, f"use the normal form {normalize_username(username)!r}"
        )


def check_password(password: str, *, username: str | None = None) -> None:
    """The password policy; every refusal is ``weak_password`` with a reason.

    Raises:
        ProtocolError: ``weak_password``.
    """
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        reason = f"a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
    elif not password.strip():
        reason = "a password cannot be only spaces"
    elif password.startswith(CREDENTIAL_PREFIX):
        reason = f"a password cannot start with {CREDENTIAL_PREFIX!r} (MQTT credentials do)"
    elif username is not None and password.casefold() == username.casefold():
        reason = "a password cannot be the username"
    elif password.casefold() in COMMON_PASSWORDS:
        reason = "this password is one of the first that guessers try"
    else:
        return
    raise errors.ProtocolError(errors.WEAK_PASSWORD, reason)


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def create(session: Session, username: str, password: str) -> Account:
    """Add an account (flushed, not committed: the caller commits).

    ``username`` must already be normalised (:func:`normalize_username`).

    Raises:
        ProtocolError: ``invalid_username``, ``weak_password`` or ``username_taken``.
    """
    check_username(username)
    check_password(password, username=username)
    account = Account(username=username, password_hash=hash_password(password))
    session.add(account)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise errors.ProtocolError(
            errors.USERNAME_TAKEN, f"the username {username!r} is taken"
        ) from None
    return account


def get(session: Session, username: str) -> Account | None:
    return session.exec(select(Account).where(Account.username == username)).first()


def exists(session: Session, username: str) -> bool:
    account = get(session, username)
    return account is not None and not account.disabled


def verify(session: Session, username: str, password: str) -> bool:
    """Whether the password is right for an enabled account (see :func:`authenticate`)."""
    return authenticate(session, username, password) is not None


def authenticate(session: Session, username: str, password: str) -> str | None:
    """The account's password hash if the password is right and the account enabled.

    ``username`` is compared as given: MQTT clients must send the normal form, which
    is what topics and the broker's ACL use. Slow by design (argon2), unless the same
    password was verified for the same stored hash a moment ago (``store.signin``).

    Raises:
        signin.Busy: too many password hashes at once in this process.
    """
    account = get(session, username) if topics.is_valid_username(username) else None
    enabled = account is not None and not account.disabled
    stored = account.password_hash if account is not None else _dummy_hash()
    # End the read before the slow hash: a caller on a writing engine holds SQLite's
    # write lock (BEGIN IMMEDIATE) until then, and the bridge must not wait ~50 ms.
    session.rollback()
    if len(password) > MAX_PASSWORD_CHARS:
        return None
    # Bounded and cached per process (store.signin); only an enabled account's own
    # hash is worth remembering.
    ok = signin.process_checks().verify(
        username, stored, password, _password_matches, cache=enabled
    )
    return stored if ok and enabled else None


def _password_matches(stored_hash: str, password: str) -> bool:
    try:
        return _hasher().verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def existing(session: Session, username: str) -> Account:
    """The account named ``username``.

    Raises:
        ProtocolError: ``unknown_user`` (also for a deleted account).
    """
    return _existing(session, username)


def _existing(session: Session, username: str) -> Account:
    account = get(session, username)
    if account is None or account.password_hash == DELETED_HASH:
        raise errors.ProtocolError(errors.UNKNOWN_USER, f"no user {username!r}")
    return account


def set_password(session: Session, username: str, password: str) -> None:
    """Replace the password (flushed, not committed).

    Raises:
        ProtocolError: ``unknown_user`` or ``weak_password``.
    """
    check_password(password, username=username)
    account = _existing(session, username)
    account.password_hash = hash_password(password)
    session.add(account)
    session.flush()


def set_disabled(session: Session, username: str, disabled: bool) -> None:
    """Disable or enable an account (flushed, not committed).

    Raises:
        ProtocolError: ``unknown_user`` (deleted accounts cannot be enabled).
    """
    _existing(session, username)
    session.execute(
        update(Account).where(col(Account.username) == username).values(disabled=disabled)
    )
    session.flush()


def delete(session: Session, username: str) -> None:
    """Delete an account for good (flushed, not committed); its name stays taken.

    Raises:
        ProtocolError: ``unknown_user``.
    """
    _existing(session, username)
    session.execute(
        update(Account)
        .where(col(Account.username) == username)
        .values(disabled=True, password_hash=DELETED_HASH)
    )
    session.flush()


def credentials_state(session: Session, usernames: list[str]) -> dict[str, tuple[str, int]]:
    """For each enabled account among ``usernames``, its password hash and its token
    generation.

    The embedded broker compares these with what it saw at sign-in: a name missing
    here (disabled, deleted), with another hash (password changed) or, for a session
    signed in by MQTT credential, another generation (tokens revoked) must be dropped.
    """
    if not usernames:
        return {}
    rows = session.exec(
        select(Account.username, Account.password_hash, Account.token_generation).where(
            col(Account.username).in_(usernames), ~col(Account.disabled)
        )
    ).all()
    return {name: (password_hash, generation) for name, password_hash, generation in rows}
