"""Drills and the expiry warning: requests.drill, command_at, warned_at; periodic_runs.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("drill", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("command_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("warned_at", sa.DateTime(timezone=True)))
    op.create_index("ix_requests_drill_scope", "requests", ["drill", "scope"])
    op.create_table(
        "periodic_runs",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("breakglass migrations go forward only: restore a backup instead")
