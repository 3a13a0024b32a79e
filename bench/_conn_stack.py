"""The stacks the connection benchmark runs against, with their accounts made in bulk.

Creating 50,000 accounts one by one over ``$CONTROL/dynamic-security/v1`` (two
commands each, and dynsec rewrites its whole JSON file after every command) grows
quadratically; instead the accounts are written before the broker starts:

* mosquitto: the same ``dynamic-security.json`` that ``core.dynsec`` bootstraps,
  plus, per user, exactly what :class:`core.dynsec.DynsecProvisioner` would have
  created: a role ``user:{name}`` with :func:`core.dynsec.user_acls` and a
  client with that role and ``mqchat-user``, its password hashed by
  :func:`core.dynsec.hash_password` (PBKDF2-SHA512, 101 iterations, dynsec's
  own count, with a salt of its own per account).
* the database: one ``accounts`` row per user, inserted in one statement, and the
  1:1 conversations that make users contacts (presence goes to contacts only). Every bench
  user has the same password (random per run), so one argon2 hash, computed once
  with the real parameters, serves every row; the embedded broker pays the real
  argon2 verification on every CONNECT.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, text

from core.dynsec import (
    USER_ROLE,
    Credentials,
    dynsec_bootstrap,
    hash_password,
    user_acls,
    user_role,
)
from store import accounts, make_engine, migrate
from store.messages import direct_key, new_conversation_id
from store.tables import Account, Conversation, Member
from store.types import utcnow
from tests.support.services import (
    LOOPBACK,
    Daemon,
    MosquittoServer,
    prepare_mosquitto,
    start_postgres,
)
from tests.support.stack import bridge_daemon, bridge_settings, start_embedded_broker


def rss_kib(pid: int) -> int:
    """Resident set size of one process, from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def nofile_limit(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/limits") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return f"{soft}/{hard}"
    except OSError:
        pass
    return "?"


@dataclass
class BenchStack:
    name: str
    host: str
    port: int
    engine: Engine
    broker_pid: int
    bridge: Daemon
    password: str
    monitor: str
    broker_log: Path
    sys_reader: Credentials | None = None
    setup_s: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def bridge_pid(self) -> int:
        assert self.bridge.pid is not None
        return self.bridge.pid

    def bridge_alive(self) -> bool:
        return self.bridge.alive

    def online_devices(self) -> int:
        """Bench devices the bridge has recorded as online."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM devices WHERE online AND device = 'bench'")
                ).scalar_one()
            )

    def broker_warnings(self, limit: int = 8) -> dict[str, int]:
        """Broker log lines that say something went wrong, counted by their text."""
        counts: dict[str, int] = {}
        try:
            lines = self.broker_log.read_text(errors="replace").splitlines()
        except OSError:
            return counts
        for line in lines:
            lowered = line.lower()
            if any(
                w in lowered for w in ("error", "unable", "refus", "denied", "exceed", "warning")
            ):
                key = re.sub(r"[0-9]+(\.[0-9]+)*", "N", line.split(": ", 1)[-1])[:160]
                if key in counts or len(counts) < limit:
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:  # clean up the rest regardless
                print(f"cleanup: {exc}", flush=True)
        self._closers.clear()


def _insert_accounts(engine: Engine, names: list[str], password: str) -> None:
    password_hash = accounts.hash_password(password)
    now = utcnow()
    rows = [
        {"username": name, "password_hash": password_hash, "created_at": now, "disabled": False}
        for name in names
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), 10_000):
            conn.execute(insert(Account), rows[start : start + 10_000])


#: A bench-only account that may read mosquitto's ``$SYS/broker/heap/current`` (the
#: heap mosquitto has allocated, which RSS hides: the heap freed after loading the
#: dynsec file is reused by new connections without RSS moving).
SYS_ROLE = "bench-sys"


def dynsec_with_users(
    *,
    admin: Credentials,
    bridge: Credentials,
    names: list[str],
    password: str,
    sys_reader: Credentials | None = None,
) -> dict[str, Any]:
    """The bootstrap file plus what ``DynsecProvisioner.create_user`` makes per name."""
    doc = dynsec_bootstrap(admin=admin, bridge=bridge)
    if sys_reader is not None:
        doc["roles"].append(
            {
                "rolename": SYS_ROLE,
                "acls": [
                    {"acltype": t, "topic": "$SYS/broker/heap/#", "priority": 0, "allow": True}
                    for t in ("subscribePattern", "publishClientReceive")
                ],
            }
        )
        doc["clients"].append(
            {
                "username": sys_reader.username,
                **hash_password(sys_reader.password),
                "roles": [{"rolename": SYS_ROLE}],
            }
        )
    for name in names:
        doc["roles"].append({"rolename": user_role(name), "acls": user_acls(name)})
        doc["clients"].append(
            {
                "username": name,
                **hash_password(password),
                "roles": [{"rolename": user_role(name)}, {"rolename": USER_ROLE}],
            }
        )
    return doc


@dataclass
class _Setup:
    """What starting a stack needs, and what it notes for the benchmark's record."""

    base: Path
    #: Every account to make before the broker starts (the monitor's too).
    names: list[str]
    #: Their one password.
    password: str
    #: Seconds each part took to start.
    seconds: dict[str, float] = field(default_factory=dict)
    #: How to stop what has started, in the order it started.
    closers: list[Callable[[], None]] = field(default_factory=list)

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.seconds[part] = time.monotonic() - started


def _start_mosquitto(setup: _Setup, sys_reader: Credentials) -> MosquittoServer:
    """``tests.support.services.start_mosquitto`` with every account in place before start."""
    server = prepare_mosquitto(setup.base)
    with setup.timed("dynsec_json"):
        doc = dynsec_with_users(
            admin=server.admin,
            bridge=server.bridge,
            names=setup.names,
            password=setup.password,
            sys_reader=sys_reader,
        )
        path = server.data_dir / "dynamic-security.json"
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        server.own_files()
    setup.closers.append(server.close)
    with setup.timed("mosquitto_start"):
        server.start(timeout=900)
    return server


@dataclass(frozen=True)
class _Broker:
    """A started broker and database, as the bridge and the benchmark need them."""

    database_url: str
    engine: Engine
    host: str
    port: int
    bridge_password: str
    pid: int
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)
    sys_reader: Credentials | None = None


def _insert_contacts(engine: Engine, names: list[str], monitor: str, contacts: int) -> None:
    """1:1 conversations (no messages) that make users contacts, who are told each
    other's presence: each user with the ``contacts`` next ones in a ring, and the
    monitor with everyone (its ``down/presence`` then hears every user)."""
    now = utcnow()
    pairs = {(monitor, name) for name in names}
    for i, name in enumerate(names):
        for k in range(1, min(contacts, len(names) - 1) + 1):
            other = names[(i + k) % len(names)]
            pairs.add((min(name, other), max(name, other)))
    conversations, members = [], []
    for a, b in sorted(pairs):
        conversation = new_conversation_id()
        conversations.append(
            {
                "id": conversation,
                "kind": "direct",
                "direct_key": direct_key(a, b),
                "last_seq": 0,
                "created_at": now,
                "members_seq": 0,
            }
        )
        for user in (a, b):
            members.append(
                {
                    "conversation_id": conversation,
                    "username": user,
                    "joined_at": now,
                    "role": "member",
                    "since_seq": 1,
                }
            )
    with engine.begin() as conn:
        for rows, table in ((conversations, Conversation), (members, Member)):
            for start in range(0, len(rows), 10_000):
                conn.execute(insert(table), rows[start : start + 10_000])


def _start(
    name: str,
    start_broker: Callable[[_Setup], _Broker],
    base: Path,
    names: list[str],
    monitor: str,
    contacts: int,
) -> BenchStack:
    """``start_broker`` (a database with every account, and a broker), then the bridge;
    on a failure whatever was started is stopped again."""
    setup = _Setup(base, [*names, monitor], secrets.token_urlsafe(18))
    try:
        broker = start_broker(setup)
        with setup.timed("db_contacts"):
            _insert_contacts(broker.engine, names, monitor, contacts)
        settings = bridge_settings(
            broker.database_url, broker.host, broker.port, broker.bridge_password, keepalive=15
        )
        bridge = bridge_daemon(base, settings)
        setup.closers.append(bridge.stop)
        with setup.timed("bridge_start"):
            bridge.start_ready(timeout=120)
        return BenchStack(
            name=name,
            host=broker.host,
            port=broker.port,
            engine=broker.engine,
            broker_pid=broker.pid,
            bridge=bridge,
            password=setup.password,
            monitor=monitor,
            setup_s=setup.seconds,
            info=broker.info,
            broker_log=broker.log_path,
            sys_reader=broker.sys_reader,
            _closers=setup.closers,
        )
    except BaseException:
        for close in reversed(setup.closers):
            close()
        raise


def _production_broker(setup: _Setup) -> _Broker:
    with setup.timed("postgres"):
        postgres = start_postgres(setup.base)
        setup.closers.append(postgres.close)
        postgres.create_database("mqchat")
        url = postgres.url("mqchat")
        engine = make_engine(url)
        setup.closers.append(engine.dispose)
        migrate(engine)
    with setup.timed("db_accounts"):
        _insert_accounts(engine, setup.names, setup.password)
    sys_reader = Credentials("bench-sys", secrets.token_urlsafe(18))
    mosquitto = _start_mosquitto(setup, sys_reader)
    assert mosquitto.child.pid is not None
    version = subprocess.run(
        [str(postgres.bindir / "postgres"), "--version"], capture_output=True, text=True
    ).stdout.strip()
    return _Broker(
        url,
        engine,
        mosquitto.host,
        mosquitto.port,
        mosquitto.bridge.password,
        mosquitto.child.pid,
        mosquitto.log_path,
        info={"postgres": version},
        sys_reader=sys_reader,
    )


def _embedded_broker(setup: _Setup) -> _Broker:
    with setup.timed("db_accounts"):
        url = f"sqlite:///{setup.base / 'mqchat.db'}"
        engine = make_engine(url)
        setup.closers.append(engine.dispose)
        migrate(engine)
        _insert_accounts(engine, setup.names, setup.password)
    with setup.timed("broker_start"):
        # A storm of distinct users measures what the broker can take; the broker's own
        # sign-in admission rate (20/s by default) would make it a measure of that.
        broker, port, bridge_password = start_embedded_broker(
            setup.base, url, timeout=60, sign_ins_per_second=100000
        )
        setup.closers.append(broker.stop)
    assert broker.pid is not None
    return _Broker(url, engine, LOOPBACK, port, bridge_password, broker.pid, broker.log_path)


def production(base: Path, names: list[str], monitor: str, contacts: int = 0) -> BenchStack:
    """mosquitto (production config, dynsec) + bridge + PostgreSQL (fsync on)."""
    return _start("production", _production_broker, base, names, monitor, contacts)


def embedded(base: Path, names: list[str], monitor: str, contacts: int = 0) -> BenchStack:
    """amqtt (``python -m broker``) + bridge + SQLite, as ``mqchat up`` runs them."""
    return _start("embedded", _embedded_broker, base, names, monitor, contacts)
