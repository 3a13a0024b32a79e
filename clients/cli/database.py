"""``mqchat db``: the database's schema, and finding the database at all.

Every command that touches the database finds it the same way: ``--database-url``, or
the SQLite file in ``--data-dir`` that ``mqchat up`` made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import typer
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from store import make_engine, migrate
from store.db import revisions
from store.tables import Account

from .options import DEFAULT_DATA_DIR, DatabaseUrlOption, DataDirOption
from .output import EXIT_CONFIG, EXIT_UNAVAILABLE, emit, fail

DATABASE_FILE: Final = "mqchat.db"

app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)


def url_for(database_url: str | None, data_dir: Path) -> str:
    """``--database-url``, or the SQLite file in ``--data-dir``."""
    if database_url:
        return database_url
    return f"sqlite:///{data_dir.resolve() / DATABASE_FILE}"


def shown(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def open_migrated(url: str) -> Engine:
    """An engine on a database that exists and is at the head revision, or exit 78/69.

    Refusing here keeps ``user add`` from creating an empty SQLite file (or writing to
    an old schema) when pointed at the wrong place.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "")
        if not path.exists():
            fail(
                EXIT_CONFIG,
                f"no database at {path}: run `mqchat up` or "
                "`mqchat db upgrade` first (or give --data-dir / --database-url)",
            )
    engine = make_engine(url)
    try:
        current, head = revisions(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        fail(EXIT_UNAVAILABLE, f"cannot use the database {shown(url)}: {exc}")
    if current != head:
        engine.dispose()
        fail(
            EXIT_CONFIG,
            f"the database {shown(url)} is at revision {current or '(none)'}, "
            f"this mqchat needs {head}: run `mqchat db upgrade`",
        )
    return engine


def migrate_for_up(url: str) -> tuple[str, bool]:
    """Migrate, returning a line that says what was done and whether any account exists
    (which decides what ``up`` suggests next)."""
    engine = make_engine(url)
    try:
        before, head = revisions(engine)
        if before != head:
            migrate(engine)
        with Session(engine) as session:
            has_users = session.exec(select(Account.username).limit(1)).first() is not None
    except SQLAlchemyError as exc:
        fail(EXIT_UNAVAILABLE, f"cannot migrate {shown(url)}: {exc}")
    finally:
        engine.dispose()
    schema = f"schema {head}" if before == head else f"schema {before or '(empty)'} -> {head}"
    return f"{'db':<7} {shown(url)}  ({schema})", has_users


@app.command("upgrade")
def upgrade(
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Bring the schema to the newest revision (creates the SQLite file if needed)."""
    url = url_for(database_url, data_dir)
    if not database_url:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = make_engine(url)
    try:
        before, head = revisions(engine)
        if before == head:
            emit(f"{shown(url)}: already at {head} (head)")
            return
        migrate(engine)
        after, _ = revisions(engine)
    except SQLAlchemyError as exc:
        fail(EXIT_UNAVAILABLE, f"cannot migrate {shown(url)}: {exc}")
    finally:
        engine.dispose()
    emit(f"{shown(url)}: upgraded {before or '(empty)'} -> {after} (head)")
