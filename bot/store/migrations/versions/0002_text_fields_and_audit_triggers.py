"""Text for every field a user, a policy or Slack can fill; audit triggers owned here.

PostgreSQL enforced the old varchar limits and SQLite did not, so a long client
name or incident reference worked on one and failed on the other. The audit
log's append-only triggers used to be (re)created at every start; they are made
here, once.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WIDEN = {
    "requests": {"scope": (128, False), "requester": (32, False), "incident": (64, True),
                 "closed_by": (32, True)},
    "decisions": {"user_id": (32, False)},
    "outbox": {"lane": (64, False)},
    "slack_messages": {"key": (64, False), "channel": (32, False), "ts": (32, False)},
    "audit_log": {"actor": (64, False), "event": (32, False), "request_id": (16, True)},
    "token_uses": {"last_client": (128, False)},
}

SQLITE_TRIGGERS = [
    """CREATE TRIGGER audit_log_no_update
BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
    """CREATE TRIGGER audit_log_no_delete
BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
    # IS NOT (not <>) so that a NULL seq is refused too.
    """CREATE TRIGGER audit_log_next_seq
BEFORE INSERT ON audit_log
WHEN NEW.seq IS NOT COALESCE((SELECT MAX(seq) FROM audit_log), 0) + 1
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: seq must be the next number'); END""",
]

# restrict_violation (23001) is an integrity error, as SQLite's RAISE(ABORT) is.
PG_TRIGGERS = [
    """CREATE OR REPLACE FUNCTION audit_log_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$fn$""",
    """CREATE OR REPLACE FUNCTION audit_log_check_seq() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    expected bigint;
BEGIN
    SELECT COALESCE(MAX(seq), 0) + 1 INTO expected FROM audit_log;
    IF NEW.seq IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'audit_log is append-only: seq must be %, not %', expected, NEW.seq
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$fn$""",
    "DROP TRIGGER IF EXISTS audit_log_no_update_delete ON audit_log",
    """CREATE TRIGGER audit_log_no_update_delete
BEFORE UPDATE OR DELETE ON audit_log
FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change()""",
    "DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log",
    """CREATE TRIGGER audit_log_no_truncate
BEFORE TRUNCATE ON audit_log
FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change()""",
    "DROP TRIGGER IF EXISTS audit_log_next_seq ON audit_log",
    """CREATE TRIGGER audit_log_next_seq
BEFORE INSERT ON audit_log
FOR EACH ROW EXECUTE FUNCTION audit_log_check_seq()""",
]


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:  # a 0.1.0 database has them; the table copy below must not carry them
        for name in ("audit_log_no_update", "audit_log_no_delete", "audit_log_next_seq"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    for table, columns in WIDEN.items():
        with op.batch_alter_table(table) as batch:
            for column, (length, nullable) in columns.items():
                batch.alter_column(column, type_=sa.Text(), existing_type=sa.String(length),
                                   existing_nullable=nullable)
    for stmt in SQLITE_TRIGGERS if sqlite else PG_TRIGGERS:
        op.execute(stmt)


def downgrade() -> None:
    raise NotImplementedError("breakglass migrations go forward only: restore a backup instead")
