"""Publishing the audit log's head outside the database.

The MAC chain shows any edit, deletion or insertion in the middle of the log,
but not a cut of its tail, a whole log replaced by an older copy, or a chain
rewritten by someone holding the MAC key. A witness outside the database
closes those gaps: every hour (if anything was logged) and every
`every_events` events, the head (last sequence number and its MAC) is posted
to the incident channel, through the outbox, in the same transaction as an
audit row `head_published` that records it. An operator compares the latest
posted head with the log (`check_head`, or `breakglass audit export`): the
row with that sequence number must exist and carry that MAC.

Call `publish_head` from a periodic loop (Runtime's sweep); it is cheap when
nothing is due (one bounded read) and safe from several processes at once
(the decision is taken again under the write lock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from . import audit, outbox
from .core.clock import Clock
from .store.db import Database
from .store.schema import audit_log

EVENT = "head_published"
EVERY_EVENTS = 1000
EVERY = timedelta(hours=1)


@dataclass(frozen=True)
class Head:
    seq: int
    mac: str


async def _due(conn: AsyncConnection, now: datetime, every_events: int,
               every: timedelta) -> Head | None:
    """The head to publish now, or None when it is not time yet."""
    seq, mac = await audit.head(conn)
    if seq == 0:
        return None
    c = audit_log.c
    # Only the last `every_events` rows are looked at: a scan bounded by the primary key.
    # No publication among them means `every_events` events went unpublished: due.
    last = (await conn.execute(
        select(c.seq, c.at).where(and_(c.seq > seq - every_events, c.event == EVENT))
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
    if since_at is not None and now - _aware(since_at) >= every:
        return Head(seq, mac)
    return None


def message(head: Head) -> str:
    return (f":ledger: Audit checkpoint: the audit log's head is sequence {head.seq} with MAC "
            f"`{head.mac}`. Keep this message: an operator compares it with the log "
            "(`breakglass audit export`) to detect a log cut short, replaced or rewritten.")


async def publish_head(
    db: Database,
    audit_key: bytes,
    clock: Clock,
    channel: str,
    *,
    every_events: int = EVERY_EVENTS,
    every: timedelta = EVERY,
    force: bool = False,
    wake: Callable[[], None] | None = None,
) -> Head | None:
    """Post the head to `channel` when it is due (or `force`); return what was published.

    Due: `every_events` rows were appended since the last publication, or at
    least one row was and `every` has passed since the last publication (since
    the first row when there was none). The publication is itself an audit
    row, so the next head covers it.
    """
    every_events = max(1, every_events)
    now = clock.now()
    if not force:
        async with db.read() as conn:
            if await _due(conn, now, every_events, every) is None:
                return None
    async with db.transaction() as conn:
        if force:
            seq, mac = await audit.head(conn)
            head: Head | None = Head(seq, mac) if seq else None
        else:
            head = await _due(conn, now, every_events, every)  # again, under the lock
        if head is None:
            return None
        await audit.append(conn, audit_key, at=now, actor="breakglass", event=EVENT,
                           details={"seq": head.seq, "mac": head.mac})
        await outbox.post(conn, now, channel, message(head))
    if wake is not None:
        wake()
    return head


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
        if row["event"] == EVENT:
            details = row["details"]
            out.append((int(details["seq"]), str(details["mac"])))
    return out


def _aware(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


__all__ = ["EVENT", "EVERY", "EVERY_EVENTS", "Head", "check_head", "message", "publish_head",
           "published_heads"]
