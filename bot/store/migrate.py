"""Schema versions (Alembic): create, check and upgrade a database.

`serve` calls `ensure_current`: an empty database gets the whole schema; a
current one is left alone (no DDL at an ordinary start, so any number of
replicas can start at once); an older one is refused with the command that
upgrades it. Creating and upgrading run under the migration lock (SQLite's
write lock; a PostgreSQL advisory lock) and re-check the version once they
hold it, so replicas that start together take turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection

from .db import Database

MIGRATIONS = Path(__file__).with_name("migrations")
LOCK_KEY = 0x6267_6D69  # "bgmi": pg_advisory_xact_lock key shared by every breakglass process
BASELINE = "0001"  # the schema breakglass 0.1.0 made without migrations
UPGRADE_HINT = "run `breakglass db upgrade` (with the same BREAKGLASS_DATABASE_URL), then start again"


class SchemaError(Exception):
    """The database's schema is not the one this breakglass runs on; the message says what to do."""


@dataclass(frozen=True)
class Version:
    current: str | None  # None: no alembic_version (empty, or made by 0.1.0)
    head: str
    has_tables: bool

    @property
    def is_current(self) -> bool:
        return self.current == self.head

    @property
    def is_empty(self) -> bool:
        return self.current is None and not self.has_tables


def _config(conn: Any = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    heads = ScriptDirectory.from_config(_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have one head, found {heads}")
    return heads[0]


def _version_sync(conn: Any) -> Version:
    current = MigrationContext.configure(conn).get_current_revision()
    return Version(current=current, head=head(), has_tables=inspect(conn).has_table("requests"))


async def _lock(db: Database, conn: AsyncConnection) -> None:
    if not db.is_sqlite:  # SQLite: Database.transaction already holds the write lock
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})


async def version(db: Database) -> Version:
    async with db.read() as conn:
        return await conn.run_sync(_version_sync)


async def upgrade(db: Database) -> tuple[str | None, str]:
    """Bring the database to the newest schema; (version before, version after)."""
    async with db.transaction() as conn:
        await _lock(db, conn)
        return await conn.run_sync(_upgrade_sync)


def _upgrade_sync(conn: Any) -> tuple[str | None, str]:
    found = _version_sync(conn)
    cfg = _config(conn)
    if found.current is None and found.has_tables:
        command.stamp(cfg, BASELINE)  # a 0.1.0 database: its tables are the baseline's
    if not found.is_current:
        command.upgrade(cfg, "head")
    return found.current, found.head


async def ensure_current(db: Database) -> Version:
    """Create the schema of an empty database; refuse an older or newer one (SchemaError)."""
    found = await version(db)
    if found.is_empty:
        await upgrade(db)  # re-checks under the lock: another replica may have made it meanwhile
        return await version(db)
    _refuse_unless_current(found)
    return found


def _refuse_unless_current(found: Version) -> None:
    if found.is_current:
        return
    known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
    if found.current is not None and found.current not in known:
        raise SchemaError(
            f"the database schema is at version {found.current}, newer than this breakglass "
            f"knows ({found.head}): run the newer breakglass, or restore a backup")
    at = found.current or "0.1.0 (before migrations)"
    raise SchemaError(f"the database schema is at version {at}, this breakglass needs {found.head}: "
                      f"{UPGRADE_HINT}")
