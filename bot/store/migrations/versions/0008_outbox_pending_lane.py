"""ix_outbox_pending_lane: a partial index on outbox (lane, id) of the pending rows, so
the dispatcher finds each lane's first pending rows in time proportional to the lanes
with pending rows, not to the pending rows (`Dispatcher._due`).

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbox_pending_lane", "outbox", ["lane", "id"],
                    sqlite_where=sa.text("status = 'pending'"),
                    postgresql_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    raise NotImplementedError("breakglass migrations go forward only: restore a backup instead")
