"""Admin role: ``accounts.is_admin``, granted only by ``mqchat user admin NAME``.

No API route sets it: an admin is made by someone with the database in hand, never
by an account promoting itself.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("is_admin")
