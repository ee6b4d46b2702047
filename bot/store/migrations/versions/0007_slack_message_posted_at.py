"""slack_messages.posted_at: when the bot recorded a keyed post as sent, so a drill's
"card" time is one primary-key read instead of a scan of the outbox's sent rows.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("slack_messages") as batch:
        batch.add_column(sa.Column("posted_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    raise NotImplementedError("breakglass migrations go forward only: restore a backup instead")
