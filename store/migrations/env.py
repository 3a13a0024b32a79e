"""Alembic environment: migrations run on the engine handed in by ``store.db.migrate``."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from store import tables  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
engine = config.attributes.get("engine")
if engine is None:
    raise RuntimeError("run migrations through store.db.migrate(engine) or `mqchat db upgrade`")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
