"""Baseline: the schema of breakglass 0.1.0, before migrations existed.

A database made by 0.1.0 (no alembic_version table) is stamped at this revision
by `breakglass db upgrade`, then brought forward like any other.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("scope", sa.String(128), nullable=False),
        sa.Column("requester", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("incident", sa.String(64)),
        sa.Column("requested_ttl_s", sa.Integer, nullable=False),
        sa.Column("ttl_s", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("triggers", sa.Text, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("escalated_at", _TS),
        sa.Column("closed_at", _TS),
        sa.Column("closed_by", sa.String(32)),
        sa.Column("jti", sa.String(64), unique=True),
        sa.Column("kid", sa.String(64)),
        sa.Column("issued_at", _TS),
        sa.Column("token_expires_at", _TS),
        sa.Column("token_hash", sa.String(64), unique=True),
        sa.Column("revealed_at", _TS),
        sa.Column("grant", sa.Text),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_index("ix_requests_state_expires", "requests", ["state", "expires_at"])
    op.create_index("ix_requests_state_token_expires", "requests", ["state", "token_expires_at"])
    op.create_index("ix_requests_requester_created", "requests", ["requester", "created_at"])
    op.create_table(
        "decisions",
        sa.Column("request_id", sa.String(16), sa.ForeignKey("requests.id"), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.UniqueConstraint("request_id", "user_id", name="uq_decisions_request_user"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("lane", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("sent_at", _TS),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("ix_outbox_status_next", "outbox", ["status", "next_attempt_at"])
    op.create_table(
        "slack_messages",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("ts", sa.String(32), nullable=False),
    )
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(8), nullable=False),
        sa.Column("public_pem", sa.Text, nullable=False),
        sa.Column("private_enc", sa.LargeBinary, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("retired_at", _TS),
    )
    op.create_table(
        "sealed_secrets",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("blob", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(16)),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_table(
        "seen_signatures",
        sa.Column("signature", sa.String(80), primary_key=True),
        sa.Column("seen_at", _TS, nullable=False),
    )
    op.create_table(
        "token_uses",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(16), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("reported", sa.Integer, nullable=False),
        sa.Column("first_at", _TS, nullable=False),
        sa.Column("last_at", _TS, nullable=False),
        sa.Column("last_client", sa.String(128), nullable=False),
        sa.Column("reported_at", _TS, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("breakglass migrations go forward only: restore a backup instead")
