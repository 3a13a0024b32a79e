"""The database: tables, engines for SQLite and PostgreSQL, queries per domain.

::

    bridge ──persist_batch──▶ messages ──▶ conversations/members ──▶ COMMIT
    history API / CLI ──▶ accounts (argon2), conversations, messages (read)

Alembic migrations in ``migrations/`` own the schema; ``migrate(engine)`` applies them.
"""

from .db import make_engine, migrate

__all__ = ["make_engine", "migrate"]
