"""Alembic environment: migrations run on the engine handed in by ``store.db.migrate``."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlmodel import SQLModel

from store import tables, tokens  # noqa: F401  (registers the tables on SQLModel.metadata)

#: Schema objects that migrations create with DDL the models cannot describe (full-text
#: search, per dialect; an extra index on messages). Autogenerate must not drop them.
UNMODELLED_TABLE_PREFIX = "messages_fts"
UNMODELLED_INDEXES = frozenset({"ix_messages_body_fts", "ix_messages_conversation_client_id"})

config = context.config
engine = config.attributes.get("engine")
if engine is None:
    raise RuntimeError("run migrations through store.db.migrate(engine) or `mqchat db upgrade`")


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    if not reflected or compare_to is not None or name is None:
        return True
    if type_ == "table":
        return not name.startswith(UNMODELLED_TABLE_PREFIX)
    if type_ == "index":
        return name not in UNMODELLED_INDEXES
    return True


with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
