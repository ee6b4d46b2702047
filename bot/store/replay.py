"""Signatures of Slack requests already acted on, shared by every process on the database."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError

from ..core.clock import Clock
from .db import Database
from .schema import seen_signatures

WINDOW = timedelta(minutes=5, seconds=30)  # Slack's 5 minutes, plus clock skew


class ReplayGuard:
    """Two checks: an in-memory one on the ack path (this process, no I/O), and a
    database one that the background work does before it acts (every process)."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self._recent: dict[str, float] = {}

    def first_time_here(self, signature: str) -> bool:
        now = time.monotonic()
        if len(self._recent) > 50_000:
            horizon = now - WINDOW.total_seconds()
            self._recent = {k: v for k, v in self._recent.items() if v > horizon}
        if signature in self._recent:
            return False
        self._recent[signature] = now
        return True

    async def first_time(self, signature: str) -> bool:
        try:
            async with self.db.transaction() as conn:
                await conn.execute(
                    insert(seen_signatures).values(signature=signature[:80], seen_at=self.clock.now()))
        except IntegrityError:
            return False
        return True

    async def prune(self) -> int:
        async with self.db.transaction() as conn:
            result = await conn.execute(
                delete(seen_signatures).where(seen_signatures.c.seen_at < self.clock.now() - WINDOW))
        return int(result.rowcount or 0)
