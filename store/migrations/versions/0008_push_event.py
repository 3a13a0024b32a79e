"""``push_outbox.event``: a push that tells its user they were made a group member.

A push covers what its user has not acknowledged; when the newest of that is the
group event that made them a member (``created`` or ``added``), the event's kind
rides in the payload so an app can say so before it fetches anything.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.add_column("push_outbox", sa.Column("event", sa.String(16), nullable=True))


def downgrade() -> None:
    op.drop_column("push_outbox", "event")
