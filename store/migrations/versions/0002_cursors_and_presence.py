"""cursors and presence"""

import sqlalchemy as sa
from alembic import op

import store.types

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "cursor_moves",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("up_to", sa.Integer(), nullable=False),
        sa.Column("at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("cursor_moves", schema=None) as batch_op:
        batch_op.create_index(
            "ix_cursor_moves_lookup",
            ["conversation_id", "username", "device", "kind", "up_to"],
            unique=False,
        )

    op.create_table(
        "cursors",
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("delivered_seq", sa.Integer(), nullable=False),
        sa.Column("read_seq", sa.Integer(), nullable=False),
        sa.Column("delivered_at", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("read_at", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("conversation_id", "username", "device"),
    )
    op.create_table(
        "devices",
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["username"],
            ["accounts.username"],
        ),
        sa.PrimaryKeyConstraint("username", "device"),
    )


def downgrade() -> None:
    op.drop_table("devices")
    op.drop_table("cursors")
    with op.batch_alter_table("cursor_moves", schema=None) as batch_op:
        batch_op.drop_index("ix_cursor_moves_lookup")

    op.drop_table("cursor_moves")
