"""The database: tables, engines for SQLite and PostgreSQL, queries per domain.

::

    bridge ──persist_batch──▶ messages (dedupe, seq in the commit) ──▶ COMMIT
           ──advance_batch──▶ cursors (per device, forward only, moves logged;
                              a group's moves tallied per message sender)
           ──update_batch───▶ presence (per device; expire() for silent ones)
    history API ──▶ tokens, history (pages, trace, conversations), search (FTS)
    CLI / API sign-up ──▶ accounts (argon2)

Alembic migrations in ``migrations/`` own the schema; ``migrate(engine)`` applies them.
"""

from .db import make_engine, migrate, reading

__all__ = ["make_engine", "migrate", "reading"]
