"""Tables. SQLAlchemy Core, not the ORM: every hot path is one or two statements.

Every change here arrives as a migration in `migrations/versions/` too
(tests/test_migrations.py compares the two on both backends). A column that a
user, a policy or Slack can fill is Text: no backend cuts or refuses it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.sql.elements import ColumnElement

metadata = MetaData()

# A break-glass request and, once approved, the token it was granted.
# The token itself is never stored: only its SHA-256 (token_hash).
requests = Table(
    "requests",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("scope", Text, nullable=False),
    Column("requester", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("incident", Text),
    Column("requested_ttl_s", Integer, nullable=False),
    Column("ttl_s", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("triggers", Text, nullable=False, default="[]"),  # JSON list of probe results
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),  # request deadline
    Column("escalated_at", DateTime(timezone=True)),
    Column("closed_at", DateTime(timezone=True)),
    Column("closed_by", Text),
    # token, set at quorum
    Column("jti", String(64), unique=True),
    Column("kid", String(64)),
    Column("issued_at", DateTime(timezone=True)),
    Column("token_expires_at", DateTime(timezone=True)),
    Column("token_hash", String(64), unique=True),
    Column("revealed_at", DateTime(timezone=True)),
    Column("grant", Text),  # JSON: audience and permissions fixed at quorum
    # JSON list: the requester's overdue reviews at request time (the card warns)
    Column("overdue_reviews", Text),
    Column("version", Integer, nullable=False, default=0),
    # A rehearsal (/breakglass drill): its token is for the audience breakglass-drill, which
    # no relying service accepts; drills count for no rate limit, alert or review.
    Column("drill", Boolean, nullable=False, default=False, server_default=false()),
    Column("command_at", DateTime(timezone=True)),  # when the command reached the bot
    Column("warned_at", DateTime(timezone=True)),  # the expiry warning went out (once)
)
Index("ix_requests_state_expires", requests.c.state, requests.c.expires_at)
Index("ix_requests_state_token_expires", requests.c.state, requests.c.token_expires_at)
Index("ix_requests_requester_created", requests.c.requester, requests.c.created_at)
Index("ix_requests_drill_scope", requests.c.drill, requests.c.scope)

# One row per person and request: the unique constraint is what makes
# "each approver counts once" hold under concurrent clicks.
decisions = Table(
    "decisions",
    metadata,
    Column("request_id", String(16), ForeignKey("requests.id"), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("decision", String(8), nullable=False),  # approve | deny
    Column("at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("request_id", "user_id", name="uq_decisions_request_user"),
)

# Transactional outbox: every Slack side effect, written with the state change.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("lane", Text, nullable=False),  # delivery order is kept per lane (channel)
    Column("kind", String(32), nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(8), nullable=False, default="pending"),  # pending|sent|dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("last_error", Text),
)
Index("ix_outbox_status_next", outbox.c.status, outbox.c.next_attempt_at)
# The pending rows of each lane in order: `Dispatcher._due` finds the lanes with pending
# rows and the first rows of each through it, in time proportional to the lanes, not to
# the pending rows (30,000 after a large revocation pass or a long Slack outage).
Index("ix_outbox_pending_lane", outbox.c.lane, outbox.c.id,
      sqlite_where=text("status = 'pending'"), postgresql_where=text("status = 'pending'"))

# Slack messages the bot posted and may edit later, by a stable key such as
# "card:R7K2QX9" or "dm:R7K2QX9". Holding ts here is what stops a retry from re-posting.
slack_messages = Table(
    "slack_messages",
    metadata,
    Column("key", Text, primary_key=True),
    Column("channel", Text, nullable=False),
    Column("ts", Text, nullable=False),
    Column("posted_at", DateTime(timezone=True)),  # when the sender recorded it (NULL: before 0007)
)

# Signing keys; the private half is AES-GCM encrypted under the master key.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(8), nullable=False),
    Column("public_pem", Text, nullable=False),
    Column("private_enc", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("retired_at", DateTime(timezone=True)),
)

# Other secrets the bot generates (the audit log's MAC key), sealed like the signing
# keys, so that rotating the master key re-encrypts them instead of changing them.
sealed_secrets = Table(
    "sealed_secrets",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("blob", LargeBinary, nullable=False),
)

# Append-only, hash-chained audit log. Triggers (see audit.py) refuse
# UPDATE, DELETE and any insert but the next sequence number.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("request_id", Text),
    Column("details", Text, nullable=False),
    Column("mac", String(64), nullable=False),
)

# Signatures of Slack requests already acted on (replay guard across processes).
seen_signatures = Table(
    "seen_signatures",
    metadata,
    Column("signature", String(80), primary_key=True),
    Column("seen_at", DateTime(timezone=True), nullable=False),
)

# Token uses reported by introspection, summarised to the incident channel.
token_uses = Table(
    "token_uses",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("request_id", String(16), nullable=False),
    Column("count", Integer, nullable=False, default=0),
    Column("reported", Integer, nullable=False, default=0),
    Column("first_at", DateTime(timezone=True), nullable=False),
    Column("last_at", DateTime(timezone=True), nullable=False),
    Column("last_client", Text, nullable=False),
    Column("reported_at", DateTime(timezone=True), nullable=False),
)

# Jobs that must run once per period across every process (the daily drill reminder):
# a process claims a run with a conditional UPDATE of its row's last_run_at.
periodic_runs = Table(
    "periodic_runs",
    metadata,
    Column("name", Text, primary_key=True),
    Column("last_run_at", DateTime(timezone=True), nullable=False),
)

# Refusals, one row each, for the per-person counts (contract §7.5 refusals_per_hour,
# and each person's rate_limit). `state`: "audited" (audited and posted one by one),
# "pending" (past the hourly threshold: waiting for the next summary), "summarised".
# Rows older than the longest window are pruned.
refusals = Table(
    "refusals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("code", Text, nullable=False),
    Column("scope", Text),
    Column("state", Text, nullable=False),
)
Index("ix_refusals_user_at", refusals.c.user_id, refusals.c.at)
Index("ix_refusals_state", refusals.c.state)

# Alert bookkeeping shared by every process: a count in a window (e.g. a token's uses
# this minute) and when it last alerted or was summarised. `key` names what is counted
# ("uses:<jti>", "refusal-summary:<user>").
alert_counters = Table(
    "alert_counters",
    metadata,
    Column("key", Text, primary_key=True),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("count", Integer, nullable=False, default=0),
    Column("last_at", DateTime(timezone=True)),
)

# Tokens that stopped being valid (revoked or expired), in order: every process polls this
# to drop them from its introspection cache, so a revocation made by one replica holds in
# every replica within `store.closures.POLL_EVERY`. Rows are pruned after `closures.KEEP`.
token_closures = Table(
    "token_closures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("token_hash", Text, nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=False),
)

# Post-incident reviews (contract section 7.1): one row per grant that ended, written in
# the transaction that ended it. The conditional updates on reminded_at / alerted_at are
# what make each reminder and alert happen once across processes.
reviews = Table(
    "reviews",
    metadata,
    Column("request_id", String(16), ForeignKey("requests.id"), primary_key=True),
    Column("requester", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("reviewed_at", DateTime(timezone=True)),
    Column("reviewed_by", Text),
    Column("summary", Text),
    Column("reminded_at", DateTime(timezone=True)),
    Column("alerted_at", DateTime(timezone=True)),
)
Index("ix_reviews_requester_due", reviews.c.requester, reviews.c.due_at)
Index("ix_reviews_due", reviews.c.reviewed_at, reviews.c.due_at)


def not_indexed(column: Column[str]) -> ColumnElement[str]:
    """`column` as an expression, so SQLite will not answer a condition on it from an index.

    `WHERE id IN (…50 ids…) AND state IN ('issued', 'revealed')`: without table
    statistics SQLite guesses that an indexed equality matches ~10 rows and picks
    `ix_requests_state_expires` over the primary key, then walks every live grant (or
    every pending outbox row) for each batch: 2.1 ms instead of 0.35 ms per 50-row
    update with 10,000 live grants, and worse the more there are. `state || ''` is the
    same value and keeps the primary key the only way in (PostgreSQL plans by its
    statistics and is not misled either way)."""
    return column.concat("")

