"""Schema versions on both backends: an empty database upgraded by the migrations
has exactly the tables the code declares; `serve` creates a missing schema,
refuses an older one with one line naming `breakglass db upgrade`, and does no
DDL (takes no migration lock) at an ordinary start; replicas started at once on
an empty database all come up; a database made by 0.1.0 upgrades with its audit
chain intact."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from bot import audit
from bot.core.kdf import new_master_key
from bot.local.sandbox import sandbox_policy
from bot.store import migrate
from bot.store.db import Database
from bot.store.schema import metadata


def _diff(conn: Any) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return [d for d in compare_metadata(ctx, metadata)]


async def test_migrations_make_what_the_models_declare(empty_database_url: str) -> None:
    db = Database(empty_database_url)
    try:
        before, after = await migrate.upgrade(db)
        assert (before, after) == (None, migrate.head())
        async with db.read() as conn:
            assert await conn.run_sync(_diff) == []
        found = await migrate.version(db)
        assert found.is_current and not found.is_empty
    finally:
        await db.dispose()


def test_one_linear_history() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate._config())
    revisions = list(script.walk_revisions())
    assert len(script.get_heads()) == 1
    assert sum(1 for r in revisions if r.down_revision is None) == 1


async def test_the_audit_triggers_come_with_the_schema(empty_database_url: str) -> None:
    db = Database(empty_database_url)
    key = audit.mac_key(new_master_key())
    try:
        await db.create_schema()
        async with db.transaction() as conn:
            await audit.append(conn, key, at=datetime.now(UTC), actor="U1", event="x", details={})
        with pytest.raises(Exception, match="append-only"):
            async with db.transaction() as conn:
                await conn.execute(text("UPDATE audit_log SET actor = 'U0EVIL'"))
        with pytest.raises(Exception, match="append-only"):
            async with db.transaction() as conn:
                await conn.execute(text("DELETE FROM audit_log"))
    finally:
        await db.dispose()


async def test_many_replicas_starting_on_an_empty_database(empty_database_url: str) -> None:
    """Eight processes' worth of engines create the schema at the same moment: one makes
    it under the lock, the others find it made; nobody fails."""
    dbs = [Database(empty_database_url) for _ in range(8)]
    try:
        await asyncio.gather(*(db.create_schema() for db in dbs))
        for db in dbs:
            assert (await migrate.version(db)).is_current
    finally:
        for db in dbs:
            await db.dispose()


def _breakglass(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60, check=False)


async def test_db_upgrade_processes_at_once_then_current(empty_database_url: str) -> None:
    env = {"BREAKGLASS_DATABASE_URL": empty_database_url}
    runs = await asyncio.gather(*(asyncio.to_thread(_breakglass, "db", "upgrade", env=env)
                                  for _ in range(4)))
    assert [r.returncode for r in runs] == [0] * 4, [r.stderr for r in runs]
    outputs = sorted(r.stdout.strip() for r in runs)
    assert sum("upgraded from nothing" in o for o in outputs) == 1, outputs
    assert sum("already at the newest" in o for o in outputs) == 3, outputs
    current = _breakglass("db", "current", env=env)
    assert current.returncode == 0
    assert f"schema version {migrate.head()}, newest {migrate.head()} (current)" in current.stdout


async def test_an_ordinary_start_takes_no_migration_lock(backend: str, database_url: str) -> None:
    """On a current database, starting does no DDL: it does not even wait for a migration
    that holds the lock (PostgreSQL advisory lock / SQLite write lock)."""
    first = Database(database_url)
    await first.create_schema()
    second = Database(database_url)
    try:
        async with first.transaction() as conn:
            if backend == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": migrate.LOCK_KEY})
            await asyncio.wait_for(second.create_schema(), 5)  # would wait 30 s for the lock
    finally:
        await first.dispose()
        await second.dispose()


async def _make_0_1_0_database(url: str, key: bytes) -> None:
    """What breakglass 0.1.0 left: its tables and triggers, rows in them, no alembic_version."""
    db = Database(url)
    try:
        async with db.transaction() as conn:
            await conn.run_sync(lambda c: _upgrade_to(c, "0001"))  # 0.1.0's tables, varchar and all
            triggers = _revision_module("0002")
            for stmt in triggers.SQLITE_TRIGGERS if db.is_sqlite else triggers.PG_TRIGGERS:
                await conn.exec_driver_sql(stmt)  # 0.1.0 made these at every start
            await conn.execute(text("DROP TABLE alembic_version"))
            for i in range(5):
                await audit.append(conn, key, at=datetime.now(UTC), actor=f"client:{'c' * 20}",
                                   event="used", details={"n": i})
    finally:
        await db.dispose()


def _revision_module(revision: str) -> Any:
    import importlib.util

    [path] = migrate.MIGRATIONS.glob(f"versions/{revision}_*.py")
    spec = importlib.util.spec_from_file_location(f"rev_{revision}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _upgrade_to(conn: Any, revision: str) -> None:
    from alembic import command

    command.upgrade(migrate._config(conn), revision)


async def test_serve_refuses_an_older_schema_and_db_upgrade_brings_it_forward(
        empty_database_url: str, tmp_path: Path) -> None:
    key_master = new_master_key()
    await _make_0_1_0_database(empty_database_url, audit.mac_key(key_master))
    (tmp_path / "p.toml").write_text(sandbox_policy("http://127.0.0.1:9", os.urandom(8).hex()))
    env = {"BREAKGLASS_DATABASE_URL": empty_database_url, "BREAKGLASS_MASTER_KEY": key_master,
           "SLACK_BOT_TOKEN": "xoxb-" + os.urandom(8).hex(), "SLACK_SIGNING_SECRET": os.urandom(16).hex(),
           "SLACK_API_URL": "http://127.0.0.1:9/", "BREAKGLASS_POLICY": str(tmp_path / "p.toml"),
           "BREAKGLASS_HOST": "127.0.0.1", "BREAKGLASS_PORT": "9"}
    refused = _breakglass("serve", env=env)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("breakglass: ")]  # after any warnings
    assert "Traceback" not in refused.stderr and errors == lines[-1:], refused.stderr
    assert "0.1.0 (before migrations)" in errors[0] and "breakglass db upgrade" in errors[0]

    upgraded = _breakglass("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"to {migrate.head()}" in upgraded.stdout
    db = Database(empty_database_url)
    try:
        assert (await migrate.version(db)).is_current
        result = await audit.verify(db, audit.mac_key(key_master))
        assert (result.ok, result.rows) == (True, 5)  # the table copy kept every row and MAC
        with pytest.raises(Exception, match="append-only"):  # and the triggers are back
            async with db.transaction() as conn:
                await conn.execute(text("DELETE FROM audit_log"))
    finally:
        await db.dispose()


async def test_a_newer_schema_is_refused(database_url: str) -> None:
    db = Database(database_url)
    try:
        await db.create_schema()
        async with db.transaction() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(migrate.SchemaError, match="newer than this breakglass"):
            await db.create_schema()
    finally:
        await db.dispose()
