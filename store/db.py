"""Engines for SQLite and PostgreSQL, with the durability settings mqchat relies on."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``).

    SQLite runs in WAL mode with ``synchronous=FULL`` so a committed message survives
    power loss, and every transaction starts with ``BEGIN IMMEDIATE`` so that reading
    a conversation's ``last_seq`` and writing the next one cannot interleave with
    another process. PostgreSQL keeps its durable defaults (``synchronous_commit=on``).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    # A pooled connection is tested before use unless the caller retries disconnects
    # itself (the bridge does: a ping would cost it a round trip per batch).
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own implicit
        # BEGIN comes too late: after the SELECT that reads last_seq).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        record.info["synchronous"] = "FULL"
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        if options.get(_READ_ONLY, False):
            conn.exec_driver_sql("BEGIN DEFERRED")
            return
        # Per transaction, and only when it changes: a pooled connection may have
        # served a relaxed write last.
        level = "NORMAL" if options.get(_RELAXED, False) else "FULL"
        info = conn.connection.info
        if info.get("synchronous") != level:
            conn.exec_driver_sql(f"PRAGMA synchronous={level}")
            info["synchronous"] = level
        conn.exec_driver_sql("BEGIN IMMEDIATE")


#: Execution option of :func:`reading` engines: their transactions only read.
_READ_ONLY: Final = "mqchat_read_only"
#: Execution option of :func:`relaxed` engines: their commits need not reach the disk.
_RELAXED: Final = "mqchat_relaxed"


def relaxed(engine: Engine) -> Engine:
    """The same database for writes whose loss in a power cut costs a sign-in, never a
    message: the tokens of ``POST /v1/tokens``.

    On SQLite such a commit skips its fsync (``synchronous=NORMAL`` in WAL mode), so it
    holds the database's one write lock for microseconds instead of a disk flush. A
    token write at FULL held the lock up to 24 ms, and the bridge, waiting on SQLite's
    busy handler (which sleeps 1, 2, 5, ... 100 ms between tries), missed its turn
    again and again: others' chat stalled ~300 ms at a time during a sign-in burst.
    The next FULL commit (every bridge batch) flushes the log with these frames in it,
    and the database stays consistent whatever happens; only the last relaxed commits
    before a power cut (not a process crash) can be lost, and their clients sign in
    again. PostgreSQL is unchanged.
    """
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{_RELAXED: True})
    return engine


def reading(engine: Engine) -> Engine:
    """The same database for transactions that only read: sign-in lookups, history.

    On SQLite, ``BEGIN IMMEDIATE`` takes the database's one write lock, so every read
    would queue behind the bridge's commits and the bridge behind every read: a burst
    of sign-ins held others' chat at p99 x15. A deferred transaction reads a WAL
    snapshot and takes no lock. Writing through it is a mistake that SQLite would
    only catch as ``database is locked`` under load, so keep writes on ``engine``.

    On PostgreSQL it runs in autocommit: at the default READ COMMITTED every statement
    takes its own snapshot anyway, so an explicit transaction adds nothing for reads
    but a BEGIN and a ROLLBACK round trip each.
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine.execution_options(**{_READ_ONLY: True})


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


@functools.cache
def head_revision() -> str:
    """The newest schema revision this code knows (read once: the scripts do not
    change under a running process)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("store/migrations has no head revision")
    return head


def current_revision(conn: Connection) -> str | None:
    """The schema revision of the database behind ``conn`` (None: not migrated)."""
    current: str | None = MigrationContext.configure(conn).get_current_revision()
    return current


def revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's schema revision, the newest this code knows).

    Every daemon and command that uses the database checks these are equal before it
    starts: code on an older or newer schema would fail later, in the middle of work.
    """
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("store/migrations has no head revision")
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    command.upgrade(alembic_config(engine), "head")
