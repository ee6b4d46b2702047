"""Closed tokens, heard by every process that shares the database.

Each process keeps verified tokens in memory (introspection.py), so a token
revoked or expired by another replica must reach it without a database read per
introspection. The transaction that closes a revealed token also appends its
hash to `token_closures` (`record`); every process reads the rows after the
last one it saw every `POLL_EVERY` seconds (`ClosureFeed`) and drops those
tokens from its cache. One indexed range read per process per poll, whatever
the introspection load, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, insert, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .db import Database
from .schema import requests, token_closures

log = logging.getLogger(__name__)
POLL_EVERY = 0.04  # seconds: a revocation holds in every replica well within 100 ms
KEEP = timedelta(minutes=10)  # a process that misses rows for longer than this re-reads everything


async def record(conn: AsyncConnection, request_id: str, at: datetime) -> None:
    """In the closing transaction: append the request's token hash, if it was revealed."""
    await conn.execute(insert(token_closures).from_select(
        ["token_hash", "closed_at"],
        select(requests.c.token_hash, literal(at, token_closures.c.closed_at.type))
        .where(requests.c.id == request_id, requests.c.token_hash.is_not(None))))


async def record_replaced(conn: AsyncConnection, request_id: str, new_hash: str,
                          at: datetime) -> None:
    """In the transaction that re-mints a request's token text (a retried `message` DM):
    the text it replaces is closed like a revoked one, in every process."""
    await conn.execute(insert(token_closures).from_select(
        ["token_hash", "closed_at"],
        select(requests.c.token_hash, literal(at, token_closures.c.closed_at.type))
        .where(requests.c.id == request_id, requests.c.token_hash.is_not(None),
               requests.c.token_hash != new_hash)))


async def record_many(conn: AsyncConnection, request_ids: Sequence[str], at: datetime) -> None:
    """`record` for many requests closed in one statement (a policy reload's batch)."""
    if request_ids:
        await conn.execute(insert(token_closures).from_select(
            ["token_hash", "closed_at"],
            select(requests.c.token_hash, literal(at, token_closures.c.closed_at.type))
            .where(requests.c.id.in_(bindparam("ids", expanding=True)),
                   requests.c.token_hash.is_not(None))), {"ids": list(request_ids)})


async def prune(db: Database, now: datetime) -> int:
    async with db.transaction() as conn:
        result = await conn.execute(delete(token_closures).where(token_closures.c.closed_at < now - KEEP))
    return int(result.rowcount or 0)


class ClosureFeed:
    """Polls `token_closures`; calls `on_closed(hashes)` with each new batch.

    On PostgreSQL ids are taken at insert and rows become visible at commit, so a
    lower id can appear after a higher one was read: ids skipped over are kept as
    holes and asked for again for `HOLE_WAIT` seconds (a rolled-back insert leaves
    a hole that never fills). The cache's own re-read (REVALIDATE_AFTER) is the
    backstop if the database cannot be read at all."""

    HOLE_WAIT = 60.0

    def __init__(self, db: Database, on_closed: Callable[[Sequence[str]], None]) -> None:
        self.db = db
        self.on_closed = on_closed
        self.last_id: int | None = None
        self.holes: dict[int, float] = {}  # id: give up after (monotonic)
        self.poll_every = POLL_EVERY

    async def start(self) -> None:
        async with self.db.read() as conn:
            self.last_id = (await conn.execute(select(func.max(token_closures.c.id)))).scalar() or 0

    async def poll(self) -> int:
        assert self.last_id is not None, "start() first"
        now = time.monotonic()
        self.holes = {i: until for i, until in self.holes.items() if until > now}
        wanted = token_closures.c.id > self.last_id
        if self.holes:
            wanted = or_(wanted, token_closures.c.id.in_(list(self.holes)))
        async with self.db.read() as conn:
            rows = (await conn.execute(select(token_closures.c.id, token_closures.c.token_hash)
                                       .where(wanted).order_by(token_closures.c.id))).all()
        if not rows:
            return 0
        for row in rows:
            self.holes.pop(row.id, None)
            if row.id > self.last_id + 1:
                for missing in range(self.last_id + 1, row.id):
                    self.holes[missing] = now + self.HOLE_WAIT
            self.last_id = max(self.last_id, row.id)
        self.on_closed([r.token_hash for r in rows])
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll()
            except Exception as exc:  # noqa: BLE001 - keep polling; the cache also re-reads
                log.warning("could not read token closures: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_every)
