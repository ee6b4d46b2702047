"""Signatures of Slack requests already acted on, shared by every process on the database.

A signature is kept until its *own* timestamp has left the acceptance window (plus
skew), not only for a window after it was first seen: Slack's clock may run ahead of
ours, and a request stamped up to 5 minutes in the future is accepted until 5 minutes
after that stamp. So a signature is kept from the later of "first seen" and its own
timestamp (`seen_at` in the database holds that time), for `WINDOW`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..core.clock import Clock
from .db import Database
from .schema import seen_signatures

WINDOW = timedelta(minutes=5, seconds=30)  # Slack's 5 minutes, plus clock skew
_WINDOW_S = WINDOW.total_seconds()
MAX_RECENT = 50_000  # in-memory entries before the expired ones are dropped


class ReplayGuard:
    """Two checks: an in-memory one on the ack path (this process, no I/O), and a
    database one that the background work does before it acts (every process)."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self._recent: dict[str, tuple[float, float]] = {}  # signature: (keep until, stamp)
        self._waiting: list[tuple[str, float | None, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def first_time_here(self, signature: str, timestamp: float,
                        now: float | None = None) -> bool:
        """True unless this process saw `signature` (stamped `timestamp`, Unix seconds)
        while it could still be accepted. Wall-clock time, as the signature check."""
        now = time.time() if now is None else now
        seen = self._recent.get(signature)
        if seen is not None and seen[0] > now:
            return False
        if len(self._recent) > MAX_RECENT:
            self._recent = {k: v for k, v in self._recent.items() if v[0] > now}
        self._recent[signature] = (max(now, timestamp) + _WINDOW_S, timestamp)
        return True

    async def first_time(self, signature: str) -> bool:
        """True for the first process to record `signature`. Concurrent calls share
        one transaction (a group commit), so a burst of Slack requests costs one write."""
        key = signature[:80]
        seen = self._recent.get(signature)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiting.append((key, seen[1] if seen else None, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                fresh = await self._record({k: stamp for k, stamp, _ in batch})
            except Exception as exc:  # noqa: BLE001 - every waiter hears about it
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for k, _, fut in batch:
                if not fut.done():
                    fut.set_result(k in fresh)
                    fresh.discard(k)  # the same signature twice in one batch: once only

    async def _record(self, stamps: dict[str, float | None]) -> set[str]:
        """Record each key (with its request's timestamp, if known); return those no
        process had recorded before."""
        wanted = sorted(stamps)
        now = self.clock.now()

        def kept_from(key: str) -> datetime:
            stamp = stamps[key]
            if stamp is None:
                return now
            return max(now, datetime.fromtimestamp(stamp, UTC))
        async with self.db.transaction() as conn:
            dialect = conn.dialect
            if dialect.name in ("sqlite", "postgresql") and dialect.insert_returning and (
                    len(wanted) == 1 or dialect.insert_executemany_returning):
                # One statement: insert what is new, and hear back which ones those were.
                insert_ = sqlite_insert if dialect.name == "sqlite" else pg_insert
                stmt = (insert_(seen_signatures)
                        .on_conflict_do_nothing(index_elements=["signature"])
                        .returning(seen_signatures.c.signature))
                rows = [{"signature": k, "seen_at": kept_from(k)} for k in wanted]
                result = await conn.execute(stmt, rows if len(rows) > 1 else rows[0])
                return set(result.scalars())
            seen = set((await conn.execute(
                select(seen_signatures.c.signature)
                .where(seen_signatures.c.signature.in_(wanted)))).scalars())
            fresh = set(wanted) - seen
            if fresh:
                await conn.execute(insert(seen_signatures),
                                   [{"signature": k, "seen_at": kept_from(k)} for k in fresh])
        return fresh

    async def prune(self) -> int:
        """Forget signatures kept for WINDOW since the later of first sight and their
        own timestamp: none of them can pass the signature check any more."""
        async with self.db.transaction() as conn:
            result = await conn.execute(
                delete(seen_signatures).where(seen_signatures.c.seen_at < self.clock.now() - WINDOW))
        return int(result.rowcount or 0)
