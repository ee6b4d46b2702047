"""Alerts and the refusal flood: refusals (per-person counts) and alert_counters.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refusals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("code", sa.Text, nullable=False),
        sa.Column("scope", sa.Text),
        sa.Column("state", sa.Text, nullable=False),
    )
    op.create_index("ix_refusals_user_at", "refusals", ["user_id", "at"])
    op.create_index("ix_refusals_state", "refusals", ["state"])
    op.create_table(
        "alert_counters",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    raise NotImplementedError("breakglass migrations go forward only: restore a backup instead")
