"""Engine, connections and transactions.

SQLite: WAL, a busy timeout, and BEGIN IMMEDIATE for every transaction, so
that two writers (two tasks, or two `breakglass serve` processes on one file)
queue up instead of failing with "database is locked" half-way through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .schema import metadata

DEFAULT_URL = "sqlite+aiosqlite:///./breakglass.db"


class Database:
    def __init__(self, url: str = DEFAULT_URL, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 20
            if ":memory:" in url:
                raise ValueError("use a file for SQLite: an in-memory database is per connection")
        else:
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 10
            kwargs["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None
        if self.is_sqlite:
            _sqlite_tuning(self.engine)

    async def create_schema(self) -> None:
        from .. import audit  # triggers live with the code that relies on them

        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            for stmt in audit.trigger_ddl(self.is_sqlite):
                await conn.exec_driver_sql(stmt)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction: commit on success, roll back on any exception.

        On SQLite, writers of this process queue on an asyncio lock first: SQLite runs
        one writer at a time anyway, and waiting here holds no pooled connection and no
        thread (other processes still queue on the busy timeout)."""
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            # A plain (deferred) BEGIN: in WAL mode readers never wait for the writer.
            await conn.execution_options(breakglass_read=True)
            yield conn

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - health check reports, never raises
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()


def _sqlite_tuning(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("breakglass_read"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

