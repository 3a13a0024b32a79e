"""Accounts: creation with a password policy, argon2 verification."""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from protocol import errors, topics

from .tables import Account

MIN_PASSWORD_CHARS: Final = 8
MAX_PASSWORD_CHARS: Final = 1024


@lru_cache(maxsize=1)
def _hasher() -> PasswordHasher:
    return PasswordHasher()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Verifying against a throwaway hash for unknown users keeps the time of a
    # failed login the same whether or not the account exists.
    return _hasher().hash("not a real password")


def check_username(username: str) -> None:
    if not topics.is_valid_username(username):
        raise errors.ProtocolError(
            errors.INVALID_USERNAME,
            "a username is 2-32 characters: lower-case a-z, digits, '_' and '.', "
            "starting with a letter or digit",
        )


def check_password(password: str) -> None:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise errors.ProtocolError(
            errors.WEAK_PASSWORD,
            f"a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters",
        )


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def create(session: Session, username: str, password: str) -> Account:
    """Add an account (flushed, not committed: the caller commits).

    Raises:
        ProtocolError: ``invalid_username``, ``weak_password`` or ``username_taken``.
    """
    check_username(username)
    check_password(password)
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
    """Whether the password is right for an enabled account; slow by design (argon2)."""
    account = get(session, username) if topics.is_valid_username(username) else None
    enabled = account is not None and not account.disabled
    stored = account.password_hash if account is not None else _dummy_hash()
    # End the read before the slow hash: on SQLite every transaction holds the write
    # lock (BEGIN IMMEDIATE), and the bridge must not wait ~50 ms per login.
    session.rollback()
    try:
        ok = _hasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False
    return ok and enabled
