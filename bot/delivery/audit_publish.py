"""Audit checkpoints: publishing the audit log's head outside the database.

The MAC chain shows any edit, deletion or insertion in the middle of the log,
but not a cut of its tail, a whole log replaced by an older copy, or a chain
rewritten by someone holding the MAC key. A witness outside the database
closes those gaps: the head (last sequence number and its MAC, exactly as
stored) is signed with the bot's signing key (`bot.core.checkpoint`) and
posted to the incident channel, through the outbox, in the same transaction
as an audit row `checkpoint` that records it. `breakglass audit verify
--slack` (`bot.delivery.audit_slack`) reads the posts back and compares.

When a checkpoint is due
------------------------

* within `WITHIN` (60 s) of any `issued`, `revealed`, `delivered` (the DM of
  delivery = "message", which never writes `revealed`), `revoked` or `reviewed`
  event: such an event waits at most `gather` (15 s) so that a burst shares
  one checkpoint, then the next sweep (every second) publishes;
* at least every `every` (an hour) while anything was written;
* after `every_events` (1,000) rows without one.

Once across processes: the decision is taken again inside the write
transaction, under SQLite's write lock or, on PostgreSQL, the audit log's
advisory lock (taken before the head is read), so of several `serve`
processes sharing one database exactly one publishes a given head. The post
goes to a lane of its own (`checkpoint:<channel>`), so a backlog of incident
posts does not hold it back.

Call `publish_head` from a periodic loop (Runtime's sweep); it is cheap when
nothing is due (a few bounded reads, no write lock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import audit
from ..core import checkpoint
from ..core.clock import Clock
from ..core.tokens import SigningKey
from ..store.db import Database
from ..store.schema import audit_log
from ..store.times import aware
from . import outbox

EVENT = "checkpoint"
LEGACY_EVENT = "head_published"  # what versions before signed checkpoints wrote
EVENTS = (EVENT, LEGACY_EVENT)
SECURITY_EVENTS = ("issued", "revealed", "delivered", "revoked", "reviewed")
WITHIN = timedelta(seconds=60)  # the promise (contract §6)
GATHER = timedelta(seconds=15)  # how long a security event waits for others to share its checkpoint
EVERY_EVENTS = 1000
EVERY = timedelta(hours=1)


@dataclass(frozen=True)
class Head:
    seq: int
    mac: str


def lane(channel: str) -> str:
    return f"checkpoint:{channel}"


async def _due(conn: AsyncConnection, now: datetime, every_events: int, every: timedelta,
               gather: timedelta) -> Head | None:
    """The head to publish now, or None when it is not time yet."""
    seq, mac = await audit.head(conn)
    if seq == 0:
        return None
    c = audit_log.c
    # Only the last `every_events` rows are looked at: a scan bounded by the primary key.
    # No publication among them means `every_events` events went unpublished: due.
    last = (await conn.execute(
        select(c.seq, c.at).where(and_(c.seq > seq - every_events, c.event.in_(EVENTS)))
        .order_by(c.seq.desc()).limit(1))).first()
    if last is None:
        if seq >= every_events:
            return Head(seq, mac)
        since_seq = 0
        since_at = await conn.scalar(select(c.at).where(c.seq == 1))
    else:
        since_seq, since_at = int(last[0]), last[1]
    fresh = seq - since_seq  # rows after the last publication
    if fresh <= 0:
        return None
    if fresh >= every_events:
        return Head(seq, mac)
    if since_at is not None and now - aware(since_at) >= every:
        return Head(seq, mac)
    first_security = await conn.scalar(
        select(c.at).where(and_(c.seq > since_seq, c.event.in_(SECURITY_EVENTS)))
        .order_by(c.seq).limit(1))
    if first_security is not None and now - aware(first_security) >= gather:
        return Head(seq, mac)
    return None


async def publish_head(
    db: Database,
    audit_key: bytes,
    clock: Clock,
    channel: str,
    signing_key: SigningKey,
    *,
    every_events: int = EVERY_EVENTS,
    every: timedelta = EVERY,
    gather: timedelta = GATHER,
    force: bool = False,
    wake: Callable[[], None] | None = None,
) -> checkpoint.Signed | None:
    """Sign and post the head to `channel` when it is due (or `force`); return what was
    published. The publication is itself an audit row, so the next head covers it."""
    every_events = max(1, every_events)
    now = clock.now()
    if not force:
        async with db.read() as conn:
            if await _due(conn, now, every_events, every, gather) is None:
                return None
    async with db.transaction() as conn:
        if conn.dialect.name == "postgresql":
            # The appenders' lock, before the head is read: no row can be appended (and
            # no other process can publish) between this decision and our own append.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                               {"k": audit.ADVISORY_LOCK_ID})
        if force:
            seq, mac = await audit.head(conn)
            head: Head | None = Head(seq, mac) if seq else None
        else:
            head = await _due(conn, now, every_events, every, gather)  # again, under the lock
        if head is None:
            return None
        signed = checkpoint.sign(checkpoint.Checkpoint(head.seq, head.mac, now), signing_key)
        await audit.append(conn, audit_key, at=now, actor="breakglass", event=EVENT,
                           details=signed.details())
        await outbox.post(conn, now, channel, checkpoint.message(signed), lane=lane(channel))
    if wake is not None:
        wake()
    return signed


async def check_head(db: Database, seq: int, mac: str) -> str | None:
    """None when the log still holds row `seq` with `mac` (a published head); else what is wrong."""
    async with db.read() as conn:
        row = (await conn.execute(
            select(audit_log.c.mac).where(audit_log.c.seq == seq))).first()
        last, _ = await audit.head(conn)
    if row is None:
        return (f"the published head is sequence {seq} but the log ends at {last}: "
                "rows were removed or the log was replaced")
    if row[0] != mac:
        return (f"row {seq} has MAC {row[0]}, not the published {mac}: "
                "the log was rewritten or replaced")
    return None


async def published_heads(db: Database) -> list[tuple[int, str]]:
    """Every head the log says it published, oldest first (for an operator's comparison)."""
    out: list[tuple[int, str]] = []
    async for row in audit.export(db):
        if row["event"] in EVENTS:
            details = row["details"]
            out.append((int(details["seq"]), str(details["mac"])))
    return out


__all__ = ["EVENT", "EVENTS", "EVERY", "EVERY_EVENTS", "GATHER", "SECURITY_EVENTS", "WITHIN",
           "Head", "check_head", "lane", "publish_head", "published_heads"]
