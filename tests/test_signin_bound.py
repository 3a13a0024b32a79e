"""Password checks cost a bounded amount: few argon2 hashes at once, none for
credentials verified a moment ago, and a stale cache entry never lets anyone in.

Real argon2, real databases (SQLite and PostgreSQL), real bursts of threads; the
counters read are the ones ``store.signin`` keeps for operators.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from core.mqtt import ClosedBeforeConnack, ConnectRefused, MqttLink
from core.supervisor import NotReady
from history_api.config import ApiSettings
from history_api.throttle import SignInGuard
from store import accounts, make_engine, reading, signin, tokens
from store.db import relaxed

from .support.services import Daemon, start_mosquitto
from .support.stack import Stack, migrated_sqlite, password_of

T = TypeVar("T")


def sign_in(engine: Engine, user: str, password: str) -> bool:
    with Session(engine) as session:
        return accounts.verify(session, user, password)


def hashes_during(action: Callable[[], object]) -> int:
    """How many argon2 verifications ``action`` caused in this process."""
    checks = signin.process_checks()
    before = checks.hashes
    action()
    return checks.hashes - before


def test_a_verified_password_is_not_hashed_again(store_engine: Engine) -> None:
    assert hashes_during(lambda: sign_in(store_engine, "alice", "alice-secret-pw")) == 1
    assert hashes_during(lambda: sign_in(store_engine, "alice", "alice-secret-pw")) == 0


def test_wrong_passwords_are_never_cached(store_engine: Engine) -> None:
    for _ in range(3):
        assert hashes_during(lambda: sign_in(store_engine, "bob", "bob-wrong-pw")) == 1
    assert not sign_in(store_engine, "bob", "bob-wrong-pw")
    assert sign_in(store_engine, "bob", "bob-secret-pw")


def test_a_password_change_ends_the_old_password_at_once(store_engine: Engine) -> None:
    assert sign_in(store_engine, "alice", "alice-secret-pw")
    assert sign_in(store_engine, "alice", "alice-secret-pw")  # cached now
    with Session(store_engine) as session:
        accounts.set_password(session, "alice", "alice-new-pw-2")
        session.commit()
    assert not sign_in(store_engine, "alice", "alice-secret-pw")
    assert sign_in(store_engine, "alice", "alice-new-pw-2")


@pytest.mark.parametrize("change", ["disable", "delete"])
def test_a_disabled_or_deleted_account_is_refused_at_once(
    store_engine: Engine, change: str
) -> None:
    assert sign_in(store_engine, "carol", "carol-secret-pw")
    assert sign_in(store_engine, "carol", "carol-secret-pw")  # cached now
    with Session(store_engine) as session:
        if change == "disable":
            accounts.set_disabled(session, "carol", True)
        else:
            accounts.delete(session, "carol")
        session.commit()
    assert not sign_in(store_engine, "carol", "carol-secret-pw")


def at_once(threads: int, attempt: Callable[[int], T]) -> list[T]:
    """``attempt(0)`` ... ``attempt(threads - 1)``, each in a thread of its own, all
    released together by a barrier: a real burst."""
    start = threading.Barrier(threads)

    def released(n: int) -> T:
        start.wait()
        return attempt(n)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(released, range(threads)))


def test_concurrent_hashes_are_bounded_and_the_excess_is_refused() -> None:
    """A real burst: 24 threads verify real argon2 hashes through 2 slots, 3 waiting."""
    checks = signin.PasswordChecks(concurrency=2, queue=3, wait=30)
    stored = accounts.hash_password("a-password-1")

    def attempt(n: int) -> str:
        try:
            # Distinct usernames: each is a cache miss, so each needs a hash.
            ok = checks.verify(f"user{n}", stored, "a-password-1", accounts._password_matches)
        except signin.Busy as busy:
            return "busy" if busy.retry_after >= 1 else "busy without a wait"
        return "ok" if ok else "wrong"

    outcomes = at_once(24, attempt)
    assert checks.peak_hashing == 2
    assert outcomes.count("wrong") == 0
    # At least the two hashing and the three waiting got through; the rest were told.
    assert outcomes.count("ok") >= 5
    assert outcomes.count("busy") >= 1
    assert outcomes.count("ok") + outcomes.count("busy") == 24


def test_one_users_devices_signing_in_together_share_one_hash() -> None:
    """Six devices of one user reconnect at once (the broker restarted): one hash, and
    every device in. Without sharing, five copies of one check queued for a single
    slot with room for one waiting, and four devices were told "busy"."""
    checks = signin.PasswordChecks(concurrency=1, queue=1, wait=30)
    stored = accounts.hash_password("a-password-1")

    def attempt(_: int) -> str:
        try:
            ok = checks.verify("dana", stored, "a-password-1", accounts._password_matches)
        except signin.Busy:
            return "busy"
        return "ok" if ok else "wrong"

    outcomes = at_once(6, attempt)
    assert outcomes == ["ok"] * 6
    assert checks.hashes == 1


def test_a_shared_wrong_answer_is_still_wrong_and_not_cached() -> None:
    checks = signin.PasswordChecks(concurrency=1, queue=1, wait=30)
    stored = accounts.hash_password("a-password-1")

    def attempt(_: int) -> bool:
        return checks.verify("dana", stored, "wrong-password", accounts._password_matches)

    assert not any(at_once(4, attempt))
    before = checks.hashes
    assert not checks.verify("dana", stored, "wrong-password", accounts._password_matches)
    assert checks.hashes == before + 1


async def test_the_api_runs_a_few_sign_ins_at_once_and_queues_the_rest() -> None:
    """Twenty sign-ins on worker threads at once raised other users' API p99 5x; the
    guard lets ``sign_in_threads`` run and the others wait on the event loop."""
    guard = SignInGuard(ApiSettings(database_url="sqlite://", sign_in_threads=2))
    running, peak, lock = 0, 0, threading.Lock()

    def sign_in(n: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)  # a password check's database turn; lets the threads overlap
        with lock:
            running -= 1
        return n

    answers = await asyncio.gather(*(guard.run(partial(sign_in, n)) for n in range(12)))
    assert answers == list(range(12))
    assert peak == 2


async def connect_outcome(link: MqttLink) -> str:
    """The outcome of a CONNECT: accepted, or the reason the broker gave."""
    try:
        await link.connect()
    except ConnectRefused as refused:
        return refused.reason
    return "accepted"


def burst_size() -> int:
    """More sign-ins at once than a process lets hash or wait (per slot: 1 + 4)."""
    return 6 * (os.cpu_count() or 1) + 8


async def test_an_api_sign_in_burst_is_answered_200_or_429(embedded: Stack) -> None:
    users = [f"u{n}" for n in range(burst_size())]
    await embedded.add_users(*users)
    base = await embedded.start_api()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:

        async def token(user: str) -> httpx.Response:
            return await http.post(
                "/v1/tokens", data={"username": user, "password": password_of(user)}
            )

        answers = await asyncio.gather(*(token(u) for u in users))
        assert sorted({a.status_code for a in answers}) == [200, 429]
        for busy in (a for a in answers if a.status_code == 429):
            assert busy.json()["error"]["code"] == "rate_limited"
            assert int(busy.headers["Retry-After"]) >= 1
        # A refusal is not a failure: nobody is locked out once the burst is over.
        for user in users[:3]:
            assert (await token(user)).status_code == 200
    assert embedded.api is not None
    assert "Traceback" not in embedded.api.log_text()


def peak_rss_mib(daemon: Daemon) -> float:
    """The most memory the process ever had resident (VmHWM)."""
    assert daemon.process is not None
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


async def test_a_connect_burst_hashes_a_few_at_a_time(embedded: Stack) -> None:
    """Fifty correct CONNECTs at once once took the broker from 100 to 500 MB."""
    users = [f"u{n}" for n in range(burst_size())]
    await embedded.add_users(*users)
    broker = embedded.embedded_broker
    assert broker is not None
    before = peak_rss_mib(broker)
    links = [await embedded.raw(u, connect=False) for u in users]

    outcomes = await asyncio.gather(*(connect_outcome(link) for link in links))
    # The burst queues for the hashing slots: slower, but everyone gets in (a caller
    # who waited too long would be told "server unavailable" and try again).
    assert set(outcomes) <= {"accepted", "Server unavailable"}, set(outcomes)
    assert "accepted" in outcomes
    # argon2 takes 64 MiB a hash: one per slot at most, and room for the connections
    # (before the bound: +386 MiB here, six hashes at once, one per worker thread).
    slots = signin.PasswordChecks().concurrency
    assert peak_rss_mib(broker) - before < 64 * (slots + 2), (before, peak_rss_mib(broker))
    assert "Traceback" not in broker.log_text()


async def test_six_devices_of_one_user_connecting_at_once_all_get_in(embedded: Stack) -> None:
    """The embedded broker hashes one CONNECT's password and lets the five identical
    ones that arrived meanwhile share its answer, on any number of cores."""
    await embedded.add_users("erin")
    links = [await embedded.raw("erin", connect=False) for _ in range(6)]

    assert await asyncio.gather(*(connect_outcome(link) for link in links)) == ["accepted"] * 6


async def test_an_account_signing_in_over_and_over_is_refused_for_a_while(
    embedded: Stack,
) -> None:
    """Even cached, each sign-in costs a token write: a loop of them is refused (429)."""
    await embedded.add_users("looper", "bob")
    base = await embedded.start_api()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:

        async def token(user: str) -> httpx.Response:
            form = {"username": user, "password": password_of(user)}
            return await http.post("/v1/tokens", data=form)

        statuses = [(await token("looper")).status_code for _ in range(31)]
        assert statuses == [200] * 30 + [429]
        refused = await token("looper")
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
        assert (await token("bob")).status_code == 200


async def test_a_user_connecting_over_and_over_is_refused_for_a_while(stack: Stack) -> None:
    """After its allowance a user's CONNECTs are refused before the password is looked
    at, right or wrong; other users sign in as before. The embedded broker answers
    CONNACK 3; mosquitto's plugin can only close the connection before its CONNACK
    (both mean "try later" to the SDK)."""
    stack.set_sign_ins_per_user(5)
    await stack.add_users("looper", "bob")
    for _ in range(5):
        link = await stack.raw("looper")
        await link.close()
    for password in (password_of("looper"), "a-wrong-password"):
        link = await stack.raw("looper", password=password, connect=False)
        if stack.embedded_broker is not None:
            with pytest.raises(ConnectRefused, match="unavailable"):
                await link.connect()
        else:
            with pytest.raises(ClosedBeforeConnack):
                await link.connect()
    await stack.raw("bob")  # others are not affected
    log = stack.broker_log()
    assert "Traceback" not in log
    assert log.count("refusing sign-ins of user 'looper'") <= 1


def test_a_sign_in_lookup_does_not_hold_sqlites_write_lock(tmp_path: Path) -> None:
    """While a sign-in reads an account, the bridge commits at once: a lookup through
    ``store.reading`` takes no lock (a burst of sign-ins used to queue every commit)."""
    engine = make_engine(migrated_sqlite(tmp_path / "chat.db", "alice"))
    with Session(reading(engine)) as looking_up:
        assert accounts.exists(looking_up, "alice")  # the read transaction is open
        with Session(engine) as bridge:
            bridge.connection().exec_driver_sql("PRAGMA busy_timeout=200")
            accounts.create(bridge, "bob", password_of("bob"))
            bridge.commit()  # "database is locked" after 200 ms if the read held the lock
        assert accounts.exists(looking_up, "alice")
    engine.dispose()


def test_passwords_are_hashed_at_a_low_cpu_priority() -> None:
    """A hash must yield the core to chat: it runs on a thread at a low priority, and the
    caller's own thread keeps its priority."""
    checks = signin.PasswordChecks(concurrency=1, queue=1, wait=30)
    stored = accounts.hash_password("a-password-1")
    seen: list[int] = []

    def matches(stored_hash: str, password: str) -> bool:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return accounts._password_matches(stored_hash, password)

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert checks.verify("dana", stored, "a-password-1", matches)
    assert seen == [signin.HASHING_NICE]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_only_token_writes_skip_the_disk_flush(tmp_path: Path) -> None:
    """A token's commit holds SQLite's write lock without an fsync (synchronous NORMAL);
    every other write, on the very same pooled connection after it, flushes (FULL)."""
    engine = make_engine(migrated_sqlite(tmp_path / "chat.db", "alice"), pool_size=1)

    def synchronous(target: Engine) -> int:
        with Session(target) as session:
            level = session.connection().exec_driver_sql("PRAGMA synchronous").scalar()
            session.rollback()
        return int(level)

    normal, full = 1, 2
    assert synchronous(engine) == full
    assert synchronous(relaxed(engine)) == normal
    assert synchronous(engine) == full
    with Session(relaxed(engine)) as session:
        tokens.issue(session, "alice", timedelta(minutes=5))
        session.commit()
    assert synchronous(engine) == full
    engine.dispose()


@pytest.mark.parametrize(
    ("option", "value", "minimum"),
    [
        ("plugin_opt_sign_ins_per_minute", "thirty", "0"),
        ("plugin_opt_sign_ins_per_hour", "-1", "0"),
        ("plugin_opt_publish_rate", "fast", "0"),
        ("plugin_opt_publish_burst", "0.5", "1"),
    ],
)
def test_mosquitto_does_not_start_with_a_limit_that_is_not_a_number(
    tmp_path: Path, option: str, value: str, minimum: str
) -> None:
    """A mistyped throttle or quota in mosquitto.conf stops mosquitto at once, naming
    the option, rather than running without the limit."""
    with pytest.raises(NotReady) as refused:
        start_mosquitto(tmp_path, settings={option: value})
    assert f"{option}: not a number >= {minimum}: '{value}'" in str(refused.value)
