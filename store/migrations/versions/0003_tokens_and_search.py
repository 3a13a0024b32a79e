"""Tokens of the history API, full-text search over messages, message lookup by client id.

* ``tokens``: bearer tokens as SHA-256 hashes (``store.tokens.Token``).
* Search, per dialect (``store.search`` queries it the same way):

  - PostgreSQL: a GIN index on ``to_tsvector('simple', body)``. Queries must use
    exactly that expression for the index to apply. On a large ``messages`` table,
    creating it blocks writes while it builds; build it ``CONCURRENTLY`` by hand
    first if that matters (this migration then only sees it exists).
  - SQLite: an external-content FTS5 table ``messages_fts`` over ``messages.body``
    (rowid = ``messages.pk``), kept in step by triggers and filled from the existing
    rows. A later SQLite batch migration that recreates ``messages`` drops these
    triggers with the old table, and must create them again.

* ``ix_messages_conversation_client_id``: finding a message by its client id inside
  the caller's conversations (``GET /v1/messages/{id}``) without scanning them.

The search objects and that index are invisible to ``SQLModel.metadata``;
``migrations/env.py`` keeps autogenerate from proposing to drop them.
"""

import sqlalchemy as sa
from alembic import op

import store.types

revision = "0003"
down_revision = "0002"

SQLITE_SEARCH_UP = [
    "CREATE VIRTUAL TABLE messages_fts USING fts5("
    "body, content='messages', content_rowid='pk', tokenize='unicode61')",
    "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts(rowid, body) VALUES (new.pk, new.body); END",
    "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, body) VALUES ('delete', old.pk, old.body); "
    "END",
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF body ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, body) VALUES ('delete', old.pk, old.body); "
    "INSERT INTO messages_fts(rowid, body) VALUES (new.pk, new.body); END",
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
]
SQLITE_SEARCH_DOWN = [
    "DROP TRIGGER IF EXISTS messages_fts_update",
    "DROP TRIGGER IF EXISTS messages_fts_delete",
    "DROP TRIGGER IF EXISTS messages_fts_insert",
    "DROP TABLE IF EXISTS messages_fts",
]
POSTGRES_SEARCH_UP = [
    "CREATE INDEX IF NOT EXISTS ix_messages_body_fts ON messages "
    "USING gin (to_tsvector('simple', body))",
]
POSTGRES_SEARCH_DOWN = ["DROP INDEX IF EXISTS ix_messages_body_fts"]


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("created_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["username"], ["accounts.username"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index("ix_tokens_username", "tokens", ["username"], unique=False)
    op.create_index(
        "ix_messages_conversation_client_id",
        "messages",
        ["conversation_id", "client_id"],
        unique=False,
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        statements = SQLITE_SEARCH_UP
    elif dialect == "postgresql":
        statements = POSTGRES_SEARCH_UP
    else:
        raise NotImplementedError(f"no full-text search for {dialect}")
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_SEARCH_DOWN if dialect == "sqlite" else POSTGRES_SEARCH_DOWN:
        op.execute(statement)
    op.drop_index("ix_messages_conversation_client_id", table_name="messages")
    op.drop_index("ix_tokens_username", table_name="tokens")
    op.drop_table("tokens")
