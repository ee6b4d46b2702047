"""Engine, connections and transactions.

SQLite: WAL, and BEGIN IMMEDIATE for every write transaction, so that two
writers (two tasks, or two `breakglass serve` processes on one file) queue up
instead of failing with "database is locked" half-way through. Statements run
on the event loop (`sqlite_driver`); waiting for another process's write lock
is a sleep on the loop, never a block.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import sqlite_driver

DEFAULT_URL = "sqlite+aiosqlite:///./breakglass.db"
LOCK_WAIT_SECONDS = 30.0  # how long a writer waits for another process's write lock
sqlite_driver.register()


class Database:
    def __init__(self, url: str = DEFAULT_URL, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        self._checkpointer: sqlite_driver.Checkpointer | None = None
        if self.is_sqlite:
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 20
            if ":memory:" in url:
                raise ValueError("use a file for SQLite: an in-memory database is per connection")
            url = sqlite_driver.sqlite_url(url)
        else:
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 10
            kwargs["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None
        if self.is_sqlite:
            _sqlite_tuning(self.engine)
            path = self.engine.url.database
            assert path is not None
            self._checkpointer = sqlite_driver.Checkpointer(path)
            self._wal = sqlite_driver.WalSync(path)

    async def create_schema(self) -> None:
        """The newest schema, by migration (store/migrate.py); an empty database gets it all,
        a current one is left alone, an older one is refused (migrate.SchemaError)."""
        from .migrate import ensure_current

        await ensure_current(self)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction: commit on success, roll back on any exception.

        On SQLite, writers of this process queue on an asyncio lock first: SQLite runs
        one writer at a time anyway, and waiting here holds no pooled connection. Another
        process's writer is waited for by `_begin_immediate`."""
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock:
            conn = await self._begin_immediate()
            try:
                yield conn
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise
            finally:
                await conn.close()
            assert self._checkpointer is not None
            self._checkpointer.wrote()
        await self._wal.sync()  # durable before anyone acts on it; outside the lock: shared fsyncs

    async def _begin_immediate(self) -> AsyncConnection:
        """A connection holding SQLite's write lock; while another process holds it,
        sleep on the loop (1 ms, doubling to 50 ms) for up to LOCK_WAIT_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + LOCK_WAIT_SECONDS, 0.001
        while True:
            conn = await self.engine.connect()
            try:
                await conn.execution_options(breakglass_write=True)
                await conn.begin()
                return conn
            except (sqlite_driver.LockedError, OperationalError) as exc:
                await conn.close()
                locked = isinstance(exc, sqlite_driver.LockedError) or isinstance(
                    exc.orig, sqlite_driver.LockedError)
                if not locked or loop.time() > deadline:
                    raise
            except BaseException:
                await conn.close()
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn  # a plain (deferred) BEGIN: in WAL mode readers never wait for the writer

    async def ping(self) -> bool:
        try:
            async with self.read() as conn:  # a deferred BEGIN: never waits for a writer
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - health check reports, never raises
            return False

    async def dispose(self) -> None:
        if self._checkpointer is not None:
            await self._checkpointer.stop()
        await self.engine.dispose()


def _sqlite_tuning(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        sqlite_driver.on_connect(dbapi_conn)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Only Database.transaction writes; any other connection reads, and a plain
        # (deferred) BEGIN never waits for a writer in WAL mode.
        if conn.get_execution_options().get("breakglass_write"):
            sqlite_driver.begin_immediate(conn.connection.dbapi_connection)
        else:
            conn.exec_driver_sql("BEGIN")

