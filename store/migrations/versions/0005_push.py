"""Push when away: subscriptions, settings, the scan position, decisions and outbox.

* ``push_subscriptions``: one Web Push / UnifiedPush endpoint per device;
* ``push_prefs`` and ``push_mutes``: per-user mute and preview, per-conversation mute;
* ``push_scan``: one row, how far the push daemons have read ``messages`` (starting
  at the newest message now: nothing sent before the upgrade is pushed);
* ``push_state``: per recipient and conversation, what waits for a decision;
* ``push_outbox``: decided pushes, one per device, until sent or given up.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"

_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "push_subscriptions",
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("p256dh", sa.String(length=128), nullable=False),
        sa.Column("auth", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["username"], ["accounts.username"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("username", "device"),
    )
    op.create_table(
        "push_prefs",
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("muted", sa.Boolean(), nullable=False),
        sa.Column("preview", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["username"], ["accounts.username"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("username"),
    )
    op.create_table(
        "push_mutes",
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("username", "conversation_id"),
    )
    op.create_table(
        "push_scan",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("message_pk", _BIGINT, nullable=False),
        sa.Column("gaps", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("vapid_public_key", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        "INSERT INTO push_scan (id, message_pk, gaps) "
        "SELECT 1, COALESCE(MAX(pk), 0), '[]' FROM messages"
    )
    op.create_table(
        "push_state",
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.Column("pending_seq", sa.Integer(), nullable=False),
        sa.Column("due_at", _TS, nullable=True),
        sa.Column("decided_seq", sa.Integer(), nullable=False),
        sa.Column("pushed_at", _TS, nullable=True),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("username", "conversation_id"),
    )
    op.create_index("ix_push_state_due", "push_state", ["due_at"])
    op.create_table(
        "push_outbox",
        sa.Column("pk", _BIGINT, nullable=False),
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.Column("from_seq", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("sender", sa.String(length=32), nullable=False),
        sa.Column("preview", sa.Text(), nullable=True),
        sa.Column("decided_at", _TS, nullable=False),
        sa.Column("due_at", _TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.Column("done_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_push_outbox_due", "push_outbox", ["state", "due_at"])
    op.create_index("ix_push_outbox_trace", "push_outbox", ["conversation_id", "username", "seq"])


def downgrade() -> None:
    for table in (
        "push_outbox",
        "push_state",
        "push_scan",
        "push_mutes",
        "push_prefs",
        "push_subscriptions",
    ):
        op.drop_table(table)
