"""SQLite for SQLAlchemy's asyncio engine, run on the event loop itself.

aiosqlite sends every call (cursor, execute, fetch, close) to a thread and
back: three or four hand-offs per statement, about 0.15 ms each here, and
an Approve that reaches quorum is dozens of statements. A SQLite statement
on a local file takes a few microseconds, so this driver runs it directly
on the loop, where it costs less than the hand-off did.

What could block the loop is waiting, never work, and it is kept off:

* the write lock: `begin_immediate` tries `BEGIN IMMEDIATE` once, without a
  busy timeout; when another process holds the lock, the caller sleeps on the
  loop and tries again (`Database.transaction`);
* the fsync that makes a commit durable: `WalSync` runs it on a thread, one
  fsync for every commit that waits at that moment (a group commit);
* checkpoints (they fsync): automatic checkpoints are off on the loop's
  connections, and `Checkpointer` runs them on a thread of its own;
* readers never wait in WAL mode (a short busy timeout covers the rare WAL
  recovery after a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from typing import Any

from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util.concurrency import await_, in_greenlet

NAME = "breakglass_sqlite"  # the dialect's driver name: sqlite+breakglass_sqlite://
READ_BUSY_MS = 200  # readers: only WAL recovery after a crash can make them wait
CHECKPOINT_EVERY = 1.0  # seconds between passive checkpoints while writes happen


class LockedError(Exception):
    """Another process holds SQLite's write lock; try again later."""


async def _ready() -> None:
    return None


class _Cursor(sqlite3.Cursor):
    # SQLAlchemy's asyncio engine insists that each execute "awaited" something,
    # to catch sync drivers used by mistake; one already-finished coroutine does.
    def execute(self, *args: Any) -> Any:  # type: ignore[override]
        if in_greenlet():
            await_(_ready())
        return super().execute(*args)

    def executemany(self, *args: Any) -> Any:  # type: ignore[override]
        if in_greenlet():
            await_(_ready())
        return super().executemany(*args)

    async def _async_soft_close(self) -> None:
        # Results are read on the loop as they are fetched; nothing to buffer.
        return None


class _Connection(sqlite3.Connection):
    def cursor(self, factory: Any = _Cursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)


class InLoopSQLiteDialect(SQLiteDialect_pysqlite):
    driver = NAME
    is_async = True
    supports_statement_cache = True

    @classmethod
    def get_pool_class(cls, url: Any) -> Any:
        return AsyncAdaptedQueuePool

    def create_connect_args(self, url: Any) -> Any:
        args, kwargs = super().create_connect_args(url)
        kwargs["factory"] = _Connection
        # Connections live on the loop's thread; the pool may close one from another.
        kwargs["check_same_thread"] = False
        kwargs["timeout"] = READ_BUSY_MS / 1000
        return args, kwargs


dialect = InLoopSQLiteDialect


def register() -> None:
    from sqlalchemy.dialects import registry

    registry.register(f"sqlite.{NAME}", __name__, "InLoopSQLiteDialect")


def sqlite_url(url: str) -> str:
    """Any SQLite URL (`sqlite://`, `sqlite+aiosqlite://`, `sqlite+pysqlite://`) on this driver."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] != "sqlite":
        raise ValueError(f"not a SQLite URL: {url.split('://')[0]}://…")
    return f"sqlite+{NAME}://{rest}"


def stored_datetime(value: Any) -> str:
    """A DateTime as SQLAlchemy's SQLite dialect stores it (the value as given), for
    rows written straight to the driver by the thousand (its per-row bind processing
    costs more than the insert)."""
    return str(value.isoformat(" ", "microseconds")[:26])


def on_connect(dbapi_conn: sqlite3.Connection) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
    raw = sqlite3.Connection.cursor(dbapi_conn)  # the plain cursor: no greenlet here
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=NORMAL")  # + WalSync.sync after every commit: see WalSync
    raw.execute(f"PRAGMA busy_timeout={READ_BUSY_MS}")
    raw.execute("PRAGMA foreign_keys=ON")
    raw.execute("PRAGMA wal_autocheckpoint=0")  # Checkpointer does it off the loop
    raw.close()


def begin_immediate(dbapi_conn: sqlite3.Connection) -> None:
    """Take the write lock now or raise LockedError: never wait for it on the loop."""
    raw = sqlite3.Connection.cursor(dbapi_conn)
    try:
        raw.execute("PRAGMA busy_timeout=0")
        try:
            raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LockedError(str(exc)) from None
            raise
        finally:
            raw.execute(f"PRAGMA busy_timeout={READ_BUSY_MS}")
    finally:
        raw.close()


class Checkpointer:
    """Passive WAL checkpoints on a thread, about once a second while there are writes.

    PASSIVE never waits for readers or writers; it copies what it can. On stop,
    one last checkpoint runs so the WAL does not outgrow a short-lived process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def wrote(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a CLI may run several loops over one Database
            self._loop, self._dirty = loop, asyncio.Event()
            self._task = loop.create_task(self._run())
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(CHECKPOINT_EVERY)
            self._dirty.clear()
            await asyncio.to_thread(self._checkpoint)

    def _checkpoint(self) -> None:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = sqlite3.connect(self.path, timeout=0, check_same_thread=False,
                                                 isolation_level=None)
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                pass  # busy or gone: the next round tries again

    async def stop(self) -> None:
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            await asyncio.to_thread(self._checkpoint)
        self._task = self._loop = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class WalSync:
    """Durable commits, as `synchronous=FULL` makes them, with one fsync for many.

    With `synchronous=NORMAL` a COMMIT writes its WAL frames without an fsync:
    a crash of the process loses nothing, a crash of the machine can lose the
    last commits. `Database.transaction` therefore calls `sync()` after every
    commit and before it returns: the WAL file is fsynced (on a thread), so the
    commit is on disk before the caller, or anyone it tells, acts on it. Commits
    that wait at the same moment share one fsync. Anything another connection
    reads and then sends out (the outbox) is claimed in a write transaction of
    its own first, so it too is on disk before it leaves: fsync flushes the
    file's pages whichever process wrote them.
    """

    def __init__(self, path: str) -> None:
        self.wal = path + "-wal"
        self.directory = os.path.dirname(os.path.abspath(path))
        self._asked = 0  # sync() calls so far
        self._done = 0  # every call up to this number is covered by a finished fsync
        self._running: asyncio.Future[None] | None = None
        self._inode: int | None = None
        self.fsyncs = 0

    async def sync(self) -> None:
        self._asked += 1
        mine = self._asked
        while self._done < mine:
            if self._running is None:
                self._running = asyncio.ensure_future(self._fsync_upto(self._asked))
            await asyncio.shield(self._running)

    async def _fsync_upto(self, upto: int) -> None:
        try:
            await asyncio.to_thread(self._fsync)
            self._done = max(self._done, upto)
        finally:
            self._running = None

    def _fsync(self) -> None:
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: the last checkpoint moved everything into the database (synced)
        try:
            os.fsync(fd)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        self.fsyncs += 1
        if inode != self._inode:  # a new WAL file: its directory entry must be durable too
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._inode = inode
