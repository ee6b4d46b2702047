"""Store races found in review: a health check while another process writes (SQLite),
and a locked load that must see a decision committed while it waited (both backends)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bot.core.domain import Request, State
from bot.store import requests as store
from bot.store.db import Database


async def test_review_ping_answers_while_another_process_writes(tmp_path: Path) -> None:
    """/healthz must not report the database down because another process (a second
    `breakglass serve`, or `breakglass outbox retry`) holds SQLite's write lock: ping()
    autobegins through the `begin` hook, which takes BEGIN IMMEDIATE with no busy timeout."""
    path = tmp_path / "d.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.create_schema()
    held, release = threading.Event(), threading.Event()

    def other_writer() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(5)
        other.execute("COMMIT")
        other.close()

    t = threading.Thread(target=other_writer)
    t.start()
    try:
        await asyncio.to_thread(held.wait)
        assert await db.ping(), "ping() failed only because another writer holds the lock"
    finally:
        release.set()
        await asyncio.to_thread(t.join)
        await db.dispose()


def _request(rid: str) -> Request:
    now = datetime.now(UTC)
    return Request(id=rid, scope="payments-write", requester="U0ALICE", reason="r",
                   incident=None, requested_ttl=timedelta(minutes=30), ttl=timedelta(minutes=30),
                   state=State.PENDING, created_at=now, expires_at=now + timedelta(minutes=30))


async def test_review_pg_locked_load_sees_a_decision_committed_while_it_waited(backend: str,
                                                                              database_url: str) -> None:
    """PostgreSQL, READ COMMITTED: `load(lock=True)` is now one SELECT ... LEFT JOIN
    decisions ... FOR UPDATE OF requests. Its snapshot is taken before it waits for the
    row lock, so a decision committed by the transaction it waited for is missing (the
    request row itself was not updated, so no EvalPlanQual re-read either). Two approvers
    clicking at once: the second one's tally misses the first; quorum is not reached."""
    db = Database(database_url)
    await db.create_schema()
    try:
        async with db.transaction() as conn:
            await store.insert_request(conn, _request("BG-REVIEW1"))
        first_has_lock = asyncio.Event()
        commit_first = asyncio.Event()

        async def first() -> None:
            async with db.transaction() as conn:
                await store.load(conn, "BG-REVIEW1", lock=True)
                await store.add_decision(conn, "BG-REVIEW1", "U0BOB", "approve",
                                         datetime.now(UTC))
                first_has_lock.set()
                await commit_first.wait()

        async def second() -> Request | None:
            await first_has_lock.wait()
            async with db.transaction() as conn:
                return await store.load(conn, "BG-REVIEW1", lock=True)  # waits for first

        t1 = asyncio.create_task(first())
        t2 = asyncio.create_task(second())
        await first_has_lock.wait()
        await asyncio.sleep(0.3)  # second() is now blocked on the row lock
        commit_first.set()
        await t1
        seen = await t2
        assert seen is not None
        assert seen.approvals == ("U0BOB",), (
            f"the locked load missed a committed approval: {seen.approvals}")
    finally:
        await db.dispose()

