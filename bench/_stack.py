"""A whole mqchat for the load benchmark, every part its own process, from binaries.

* ``production``: mosquitto (the production config, dynsec) + PostgreSQL (fsync on,
  ``synchronous_commit`` on: a commit returns once its WAL is flushed) + the bridge;
* ``embedded``: amqtt (``python -m broker``) + SQLite + the bridge.

Accounts go in through the real paths, in bulk: the database rows are inserted with
one argon2 hash that every bench user shares (they share a password; hashing 1,000
passwords would take minutes of the two cores), and on mosquitto every account is made
by :class:`core.dynsec.DynsecProvisioner` (role + client over
``$CONTROL/dynamic-security/v1``), many commands in flight at once. On this throwaway
mosquitto the role all users share (``mqchat-user``) also gets publish rights on
every ``down/#``: what the raw-broker baseline needs, unused by the chat runs; amqtt
gets the same rule from ``bench/_amqtt_raw.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Engine, insert
from sqlmodel import Session

from bench._group_gen import GROUP_TOPICS
from bridge.config import BridgeSettings
from core import daemon
from core.daemon import BRIDGE_READY_LOG as READY_LOG
from core.dynsec import USER_ROLE, DynsecProvisioner
from store import accounts, make_engine, migrate
from store.tables import Account
from tests.support.services import (
    Daemon,
    MosquittoServer,
    PostgresServer,
    start_mosquitto,
    start_postgres,
)
from tests.support.stack import start_embedded_broker

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench-user-password"  # noqa: S105 (throwaway accounts on a loopback broker)
RAW_DOWNLINKS = "chat/v1/u/+/down/#"
#: Seconds; the bridges and PostgreSQL log every database turn or statement longer.
SLOW_TURN_S = 0.025
#: Megabytes of write-ahead log the bench's PostgreSQL has ready before the first step.
WARM_WAL_MB = 256
#: Run the bridge from another checkout with its own .venv, to compare two commits of
#: the bridge in one invocation against the same broker, database and generator:
#: ``MQCHAT_BENCH_BRIDGE_TREE=/path/to/checkout python -m bench.load throughput ...``
BRIDGE_TREE = (
    Path(os.environ["MQCHAT_BENCH_BRIDGE_TREE"]).resolve()
    if os.environ.get("MQCHAT_BENCH_BRIDGE_TREE")
    else None
)


def log(text: str) -> None:
    print(text, flush=True)


def user_names(count: int) -> list[str]:
    return [f"u{n:05}" for n in range(count)]


class BenchProvisioner(DynsecProvisioner):
    """DynsecProvisioner plus the one dynsec command the raw baseline needs."""

    async def allow_raw_downlinks(self) -> None:
        """Let every user publish to any user's ``down/#`` (raw baseline only), and
        publish and subscribe to ``bench/g/#`` (``bench.groups``' group-topic fan-out).

        Added to the role all users share, once, before anyone connects.
        """
        await self._run(
            {
                "command": "addRoleACL",
                "rolename": USER_ROLE,
                "acltype": "publishClientSend",
                "topic": RAW_DOWNLINKS,
                "priority": 0,
                "allow": True,
            }
        )
        # bench.groups' one-topic fan-out: a bench-only group topic, outside chat/v1.
        for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern"):
            await self._run(
                {
                    "command": "addRoleACL",
                    "rolename": USER_ROLE,
                    "acltype": acltype,
                    "topic": GROUP_TOPICS,
                    "priority": 0,
                    "allow": True,
                }
            )


@dataclass
class Stack:
    """What one benchmark run started, and the users it made in bulk."""

    kind: str  # "production" | "embedded"
    host: str
    port: int
    database_url: str
    base: Path
    bridge_password: str
    mosquitto: MosquittoServer | None = None
    postgres: PostgresServer | None = None
    broker: Daemon | None = None
    bridges: list[Daemon] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    bridge_generation: int = 1

    def start_bridges(
        self,
        count: int,
        message_rate: str,
        *,
        fresh_session: bool = False,
        tree: Path | None = BRIDGE_TREE,
        metrics_addr: str | None = None,
    ) -> None:
        """(Re)start ``count`` bridges.

        ``fresh_session``: connect under new client ids, so whatever backlog of uplinks
        the broker holds for the old ones is abandoned there (used only after a failed
        step that was already counted, to keep its backlog out of the next step).
        ``tree``: the checkout the bridges run from; ``metrics_addr``: the first
        bridge's metrics listener (``bench.load metrics-cost``).
        """
        self.stop_bridges()
        if fresh_session:
            self.bridge_generation += 1
        shared = daemon.build(
            BridgeSettings,
            database_url=self.database_url,
            mqtt_host=self.host,
            mqtt_port=self.port,
            password=self.bridge_password,
            partitions=count,
            message_rate=message_rate,
            # Every turn long enough to show in the latency timeline is logged, so
            # a stall can be matched against the bridge's log (KEEP_LOGS).
            slow_turn=SLOW_TURN_S,
        )
        for index in range(count):
            name = f"bridge-{index + 1}"
            settings = daemon.replace(
                shared, partition=index, client_id=f"mqchat-{name}-{self.bridge_generation}"
            )
            if metrics_addr is not None and index == 0:
                settings = daemon.replace(settings, metrics_addr=metrics_addr)
            # Only what is set here: a bridge of BRIDGE_TREE keeps its own defaults.
            env = daemon.environment(settings, defaults=False)
            self.bridges.append(
                Daemon(name, "bridge", env, self.base, tree=tree, ready_line=READY_LOG)
            )
        for bridge in self.bridges:
            bridge.start()
        for bridge in self.bridges:
            bridge.wait_ready(timeout=60)

    def stop_bridges(self) -> None:
        for bridge in self.bridges:
            bridge.stop()
        self.bridges = []

    async def add_users(self, count: int) -> float:
        """Create ``count`` accounts (database and broker); returns the seconds it took."""
        started = time.perf_counter()
        names = user_names(count)
        shared_hash = accounts.hash_password(PASSWORD)
        engine = make_engine(self.database_url)
        try:
            with Session(engine) as session:
                session.execute(
                    insert(Account),
                    [{"username": name, "password_hash": shared_hash} for name in names],
                )
                session.commit()
        finally:
            engine.dispose()
        if self.mosquitto is not None:
            server = self.mosquitto
            config = server.link_config(server.admin, f"bench-admin-{secrets.token_hex(4)}")
            async with BenchProvisioner(config, timeout=60) as provisioner:
                await provisioner.allow_raw_downlinks()
                gate = asyncio.Semaphore(64)

                async def one(name: str) -> None:
                    async with gate:
                        await provisioner.create_user(name, PASSWORD)

                await asyncio.gather(*(one(name) for name in names))
        self.users = names
        return time.perf_counter() - started

    def pids(self) -> dict[str, list[int]]:
        """The processes to charge CPU to, by part."""
        found: dict[str, list[int]] = {
            "bridge": [bridge.pid for bridge in self.bridges if bridge.pid is not None],
            "broker": [self.broker.pid] if self.broker and self.broker.pid else [],
            "database": [],
        }
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if self.mosquitto is not None and str(self.mosquitto.conf_path) in cmdline:
                found["broker"].append(process.pid)
            if self.postgres is not None and str(self.postgres.data_dir) in cmdline:
                found["database"].append(process.pid)
                found["database"] += [c.pid for c in process.children(recursive=True)]
        return found

    def close(self) -> None:
        self.stop_bridges()
        if self.broker is not None:
            self.broker.stop()
        if self.mosquitto is not None:
            self.mosquitto.close()
        if self.postgres is not None:
            # Its log lives beside its data, which may be in a private folder that
            # close() removes: a copy goes with the other logs (MQCHAT_BENCH_KEEP_LOGS).
            self.postgres.stop()
            with contextlib.suppress(OSError):
                shutil.copyfile(self.postgres.log_path, self.base / "postgres.log")
            self.postgres.close()


class CpuMeter:
    """CPU seconds used by sets of processes between two readings.

    Also the machine's steal time: on a virtual machine, the share of its cores'
    time the host gave to somebody else. Steal shows up here as latency that none
    of the measured processes caused.
    """

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.processes = {
            part: [p for p in (self._process(pid) for pid in pids_) if p is not None]
            for part, pids_ in pids.items()
        }
        self.before = self._read()
        self.machine_before = psutil.cpu_times()

    @staticmethod
    def _process(pid: int) -> psutil.Process | None:
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None

    def _read(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for part, processes in self.processes.items():
            total = 0.0
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
            totals[part] = total
        return totals

    def used(self) -> dict[str, float]:
        after = self._read()
        return {part: after[part] - self.before.get(part, 0.0) for part in after}

    def steal_share(self) -> float:
        """Steal time since the first reading, as a share of all cores' time (0-1)."""
        before, after = self.machine_before, psutil.cpu_times()
        elapsed = sum(after) - sum(before)
        stolen = getattr(after, "steal", 0.0) - getattr(before, "steal", 0.0)
        return stolen / elapsed if elapsed > 0 else 0.0


def _postgres_durable(server: PostgresServer) -> None:
    """fsync on (tests.support.services sets it) and synchronous_commit on, stated explicitly.

    Also logs what can stall a step (slow statements, checkpoints, autovacuum), with
    millisecond timestamps to match the steps' stall times.
    """
    with (server.data_dir / "postgresql.conf").open("a") as conf:
        conf.write(
            "\n# bench/_stack.py: durable commits\nsynchronous_commit = on\n"
            f"log_min_duration_statement = {int(SLOW_TURN_S * 1000)}\n"
            "log_checkpoints = on\nlog_autovacuum_min_duration = 0\n"
            "log_line_prefix = '%m [%p] '\n"
            f"min_wal_size = {2 * WARM_WAL_MB}MB\n"
        )
    server.restart()


def _warm_wal(engine: Engine) -> float:
    """Give the fresh cluster the recycled WAL segments a running one has; seconds taken.

    A fresh cluster creates each new 16 MB segment when its log reaches it, zero-filling
    it inside whichever commit got there: a stall of 40-60 ms about every 15 s at 1,000
    msg/s, always at the same point of the run. A cluster that has run for a while
    renames old segments instead. So: write ``WARM_WAL_MB`` of log, then a checkpoint
    recycles those segments ahead of the write position (``min_wal_size`` keeps them).
    """
    started = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        rows = WARM_WAL_MB * 1024 * 1024 // 300  # a row of this table is ~300 bytes of WAL
        conn.exec_driver_sql(
            "CREATE TABLE wal_warm AS SELECT g, repeat('x', 200) AS pad"
            " FROM generate_series(1, %(rows)s) AS g",
            {"rows": rows},
        )
        conn.exec_driver_sql("DROP TABLE wal_warm")
        conn.exec_driver_sql("CHECKPOINT")
    return time.perf_counter() - started


def start_production(base: Path) -> Stack:
    postgres = start_postgres(base)
    try:
        _postgres_durable(postgres)
        postgres.create_database("bench")
        url = postgres.url("bench")
        engine = make_engine(url)
        try:
            migrate(engine)
            seconds = _warm_wal(engine)
        finally:
            engine.dispose()
        log(f"  PostgreSQL: {WARM_WAL_MB} MB of WAL written and recycled in {seconds:.1f} s")
        mosquitto = start_mosquitto(base)
    except BaseException:
        postgres.close()
        raise
    return Stack(
        "production",
        mosquitto.host,
        mosquitto.port,
        url,
        base,
        mosquitto.bridge.password,
        mosquitto=mosquitto,
        postgres=postgres,
    )


def start_embedded(base: Path) -> Stack:
    url = f"sqlite:///{base / 'mqchat.db'}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    # The production broker plus the raw baseline's publish rule (bench/_amqtt_raw.py).
    broker, port, bridge_password = start_embedded_broker(base, url, module="bench._amqtt_raw")
    return Stack("embedded", "127.0.0.1", port, url, base, bridge_password, broker=broker)


@contextlib.contextmanager
def running_stack(kind: str, keep_dir: Path | None = None) -> Any:
    """Start a stack in a temporary directory, yield it, stop everything."""
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix=f"mqchat-load-{kind}-", dir=keep_dir))
    stack = start_production(base) if kind == "production" else start_embedded(base)
    try:
        yield stack
    finally:
        stack.close()
        if keep_dir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"  logs kept in {base}")
