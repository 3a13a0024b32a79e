"""``accounts.token_generation``: what revoking an account's tokens raises.

MQTT credentials (``POST /v1/mqtt-credentials``) are signed, not stored; each names
the generation it was issued under, and one from an older generation is refused.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("token_generation", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("accounts", "token_generation")
