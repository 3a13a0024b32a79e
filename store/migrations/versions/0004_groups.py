"""Groups: names, roles, membership periods, events in the timeline.

* ``conversations.name`` (a group's) and ``conversations.members_seq`` (the seq of the
  last membership event, what a writer's cache of members is checked against);
* ``members.role`` (``admin`` | ``member``) and ``members.since_seq`` (the seq a
  member sees the conversation from);
* ``member_periods``: every stretch of seqs a user was a member, filled here with one
  open period from seq 1 for every existing member;
* ``messages.event`` and ``messages.event_data``: a group event stored in the
  timeline, with its details as JSON.

Columns are added with plain ``ALTER TABLE ... ADD COLUMN`` on both dialects (no
batch copy on SQLite): recreating ``messages`` would drop the full-text triggers of
revision 0003.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.add_column("conversations", sa.Column("name", sa.String(length=100), nullable=True))
    op.add_column(
        "conversations",
        sa.Column("members_seq", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "members",
        sa.Column("role", sa.String(length=8), nullable=False, server_default="member"),
    )
    op.add_column(
        "members", sa.Column("since_seq", sa.Integer(), nullable=False, server_default="1")
    )
    op.add_column("messages", sa.Column("event", sa.String(length=16), nullable=True))
    op.add_column("messages", sa.Column("event_data", sa.Text(), nullable=True))
    op.create_table(
        "member_periods",
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=32), nullable=False),
        sa.Column("first_seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("conversation_id", "username", "first_seq"),
    )
    op.create_index("ix_member_periods_username", "member_periods", ["username", "conversation_id"])
    op.execute(
        "INSERT INTO member_periods (conversation_id, username, first_seq, last_seq) "
        "SELECT conversation_id, username, 1, NULL FROM members"
    )


def downgrade() -> None:
    op.drop_index("ix_member_periods_username", table_name="member_periods")
    op.drop_table("member_periods")
    op.drop_column("messages", "event_data")
    op.drop_column("messages", "event")
    op.drop_column("members", "since_seq")
    op.drop_column("members", "role")
    op.drop_column("conversations", "members_seq")
    op.drop_column("conversations", "name")
