"""Post-incident reviews (contract section 7.1): the reviews table, and on requests the
requester's overdue reviews at request time (the card warns about them).

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("overdue_reviews", sa.Text))
    op.create_table(
        "reviews",
        sa.Column("request_id", sa.String(16), sa.ForeignKey("requests.id"), primary_key=True),
        sa.Column("requester", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True)),
        sa.Column("reviewed_by", sa.Text),
        sa.Column("summary", sa.Text),
        sa.Column("reminded_at", sa.DateTime(timezone=True)),
        sa.Column("alerted_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_reviews_requester_due", "reviews", ["requester", "due_at"])
    op.create_index("ix_reviews_due", "reviews", ["reviewed_at", "due_at"])


def downgrade() -> None:
    raise NotImplementedError("breakglass migrations go forward only: restore a backup instead")
