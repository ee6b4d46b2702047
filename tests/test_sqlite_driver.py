"""The in-loop SQLite driver: waits for another process's write lock without blocking
the event loop, gives up with an error after LOCK_WAIT_SECONDS, checkpoints off the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from bot.store import db as db_module
from bot.store import sqlite_driver
from bot.store.db import Database


@pytest.fixture
async def database(tmp_path: Path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
    await database.create_schema()
    async with database.transaction() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    yield database
    await database.dispose()


def hold_write_lock(path: Path, seconds: float, held: threading.Event) -> None:
    """Another process's writer, as SQLite sees it: a connection holding BEGIN IMMEDIATE."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t (v) VALUES ('other')")
    held.set()
    time.sleep(seconds)
    other.execute("COMMIT")
    other.close()


async def test_a_writer_waits_for_the_lock_while_the_loop_keeps_running(database: Database,
                                                                       tmp_path: Path) -> None:
    held = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(tmp_path / "d.db", 0.5, held))
    holder.start()
    await asyncio.to_thread(held.wait)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    started = time.perf_counter()
    async with database.transaction() as conn:
        waited = time.perf_counter() - started
        await conn.execute(text("INSERT INTO t (v) VALUES ('mine')"))
    stop.set()
    await tick_task
    await asyncio.to_thread(holder.join)
    assert waited >= 0.3, "the transaction must not start while the other writer holds the lock"
    assert ticks >= 15, f"the event loop was blocked while waiting (only {ticks} ticks in {waited:.2f}s)"
    async with database.read() as conn:
        rows = (await conn.execute(text("SELECT v FROM t ORDER BY id"))).scalars().all()
    assert rows == ["other", "mine"]


async def test_a_writer_gives_up_after_the_lock_wait(database: Database, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db_module, "LOCK_WAIT_SECONDS", 0.2)
    held = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(tmp_path / "d.db", 1.0, held))
    holder.start()
    await asyncio.to_thread(held.wait)
    try:
        with pytest.raises(sqlite_driver.LockedError):
            async with database.transaction() as conn:
                await conn.execute(text("INSERT INTO t (v) VALUES ('never')"))
    finally:
        await asyncio.to_thread(holder.join)
    async with database.read() as conn:
        rows = (await conn.execute(text("SELECT v FROM t"))).scalars().all()
    assert rows == ["other"]
    # The pool is healthy afterwards: the next writer goes through.
    async with database.transaction() as conn:
        await conn.execute(text("INSERT INTO t (v) VALUES ('later')"))


async def test_a_failed_transaction_rolls_back(database: Database) -> None:
    with pytest.raises(RuntimeError):
        async with database.transaction() as conn:
            await conn.execute(text("INSERT INTO t (v) VALUES ('half')"))
            raise RuntimeError("boom")
    async with database.read() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 0


async def test_checkpoints_run_off_the_loop(database: Database, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    main_file = tmp_path / "d.db"
    async with database.read() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        assert sqlite3.Connection.execute(driver, "PRAGMA wal_autocheckpoint").fetchone() == (0,)
    before = main_file.stat().st_size
    for _ in range(20):
        async with database.transaction() as conn:
            await conn.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": "x" * 500}] * 50)
    deadline = time.monotonic() + sqlite_driver.CHECKPOINT_EVERY + 3
    while main_file.stat().st_size <= before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert main_file.stat().st_size > before, "no checkpoint copied the WAL into the database file"


@pytest.mark.parametrize("url, expected", [
    ("sqlite+aiosqlite:///./x.db", "sqlite+breakglass_sqlite:///./x.db"),
    ("sqlite:////var/lib/x.db", "sqlite+breakglass_sqlite:////var/lib/x.db"),
    ("sqlite+pysqlite:///x.db?mode=rw", "sqlite+breakglass_sqlite:///x.db?mode=rw"),
])
def test_every_sqlite_url_runs_on_the_loop_driver(url: str, expected: str) -> None:
    assert sqlite_driver.sqlite_url(url) == expected


def test_a_database_url_that_is_not_sqlite_is_refused_by_the_driver() -> None:
    with pytest.raises(ValueError, match="not a SQLite URL"):
        sqlite_driver.sqlite_url("postgresql+asyncpg://u:p@h/db")
