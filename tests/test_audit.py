"""The audit log: chain, database refusals, tamper detection, secrets, export."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from bot import audit
from bot.audit import AuditEvent, VerifyResult
from bot.core.kdf import new_master_key
from bot.store.db import Database

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6ImF0K2p3dCJ9"
    ".eyJzdWIiOiJVMDFPTkNBTEwxIiwiYXVkIjoicGF5bWVudHMtYXBpIn0"
    ".c2lnbmF0dXJlLWJ5dGVzLWdvLWhlcmU"
)


async def _make_db(path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.create_schema()
    return db


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    d = await _make_db(tmp_path / "a.db")
    yield d
    await d.dispose()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "a.db"


@pytest.fixture(scope="module")
def key() -> bytes:
    return audit.mac_key(new_master_key())


def _event(i: int, **kw: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "at": T0 + timedelta(seconds=i),
        "actor": f"U{i % 7:08d}",
        "event": ["requested", "approved", "issued", "revealed"][i % 4],
        "details": {"n": i, "scope": "payments-write", "approvers": ["U1", "U2"]},
        "request_id": f"R{i:06d}" if i % 3 else None,
    }
    fields.update(kw)
    return AuditEvent(**fields)


async def _fill(db: Database, key: bytes, n: int, batch: int = 1000) -> None:
    for start in range(0, n, batch):
        async with db.transaction() as conn:
            await audit.append_many(conn, key, [_event(i) for i in range(start, min(n, start + batch))])


def _tamper(path: Path, *statements: tuple[str, tuple[Any, ...]] | str) -> None:
    """What an attacker with the file does: drop the triggers, then write directly."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        for (name,) in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'"
        ).fetchall():
            con.execute(f"DROP TRIGGER {name}")
        for stmt in statements:
            if isinstance(stmt, str):
                con.execute(stmt)
            else:
                con.execute(*stmt)
    finally:
        con.close()


def _auditor_mac(key: bytes, prev: str, row: dict[str, Any]) -> str:
    """The MAC re-implemented from the module docstring alone."""

    def field(s: str) -> bytes:
        b = s.encode("utf-8")
        return str(len(b)).encode() + b":" + b + b","

    details = json.dumps(row["details"], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    msg = prev.encode() + b"".join(
        field(s)
        for s in (
            str(row["seq"]),
            row["at"],
            row["actor"],
            row["event"],
            row["request_id"] or "",
            details,
        )
    )
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- chain


async def test_append_chain_verifies(db: Database, key: bytes) -> None:
    async with db.transaction() as conn:
        assert await audit.head(conn) == (0, "0" * 64)
        seq = await audit.append(
            conn,
            key,
            at=T0,
            actor="U01ONCALL1",
            event="requested",
            details={"scope": "payments-write", "ttl_s": 900, "reason": "INC-1 auth down, é"},
            request_id="R7K2QX9",
        )
        assert seq == 1
    async with db.transaction() as conn:
        seqs = await audit.append_many(conn, key, [_event(i) for i in range(1, 30)])
        assert seqs == list(range(2, 31))
        assert await audit.append_many(conn, key, []) == []
    assert await audit.verify(db, key) == VerifyResult(True, 30, None, None)

    rows = [r async for r in audit.export(db)]
    assert [r["seq"] for r in rows] == list(range(1, 31))
    assert rows[0]["at"] == "2024-05-01T12:00:00.123456+00:00"
    assert rows[0]["details"]["reason"] == "INC-1 auth down, é"
    prev = "0" * 64
    for r in rows:
        assert _auditor_mac(key, prev, r) == r["mac"]
        prev = r["mac"]
    async with db.read() as conn:
        assert await audit.head(conn) == (30, prev)


async def test_time_is_stored_in_utc(db: Database, key: bytes) -> None:
    plus2 = timezone(timedelta(hours=2))
    async with db.transaction() as conn:
        await audit.append(
            conn, key, at=datetime(2024, 5, 1, 14, 0, tzinfo=plus2), actor="U1", event="x", details={}
        )
    [row] = [r async for r in audit.export(db)]
    assert row["at"] == "2024-05-01T12:00:00.000000+00:00"
    assert (await audit.verify(db, key)).ok


async def test_wrong_key_fails_at_row_1(db: Database, key: bytes) -> None:
    await _fill(db, key, 3)
    other = audit.mac_key(new_master_key())
    result = await audit.verify(db, other)
    assert (result.ok, result.first_bad_seq, result.rows) == (False, 1, 0)


async def test_create_schema_twice(db: Database, key: bytes) -> None:
    await _fill(db, key, 2)
    await db.create_schema()
    assert (await audit.verify(db, key)).ok


# --------------------------------------------------------------------------- the database refuses


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_log SET actor = 'U0EVIL' WHERE seq = 2",
        "UPDATE audit_log SET details = details",
        "DELETE FROM audit_log WHERE seq = 3",
        "DELETE FROM audit_log",
        # would delete row 2 without firing DELETE triggers, were it allowed
        "INSERT OR REPLACE INTO audit_log (seq, at, actor, event, details, mac)"
        " VALUES (2, '2024-01-01 00:00:00.000000', 'U0EVIL', 'x', '{}', 'ff')",
        "REPLACE INTO audit_log (seq, at, actor, event, details, mac)"
        " VALUES (3, '2024-01-01 00:00:00.000000', 'U0EVIL', 'x', '{}', 'ff')",
        # wrong seq: a gap, the past, none at all (rowid alias would pick one)
        "INSERT INTO audit_log (seq, at, actor, event, details, mac)"
        " VALUES (5, '2024-01-01 00:00:00.000000', 'U0EVIL', 'x', '{}', 'ff')",
        "INSERT INTO audit_log (seq, at, actor, event, details, mac)"
        " VALUES (0, '2024-01-01 00:00:00.000000', 'U0EVIL', 'x', '{}', 'ff')",
        "INSERT INTO audit_log (at, actor, event, details, mac)"
        " VALUES ('2024-01-01 00:00:00.000000', 'U0EVIL', 'x', '{}', 'ff')",
        "INSERT INTO audit_log (seq, at, actor, event, details, mac)"
        " VALUES (3, '2024-01-01 00:00:00.000000', 'U0EVIL', 'x', '{}', 'ff')"
        " ON CONFLICT (seq) DO UPDATE SET actor = 'U0EVIL'",
    ],
)
async def test_database_refuses(db: Database, key: bytes, db_path: Path, sql: str) -> None:
    await _fill(db, key, 3)
    with pytest.raises(IntegrityError, match="append-only"):
        async with db.transaction() as conn:
            await conn.execute(text(sql))
    # and through the stdlib driver, as someone with the file but not the intent to drop triggers
    con = sqlite3.connect(db_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute(sql)
    con.close()
    assert await audit.verify(db, key) == VerifyResult(True, 3, None, None)


async def test_next_seq_insert_is_allowed_but_forged_mac_is_caught(db: Database, key: bytes) -> None:
    """The triggers only fix the numbering; a forged row still fails the MAC."""
    await _fill(db, key, 3)
    async with db.transaction() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO audit_log (seq, at, actor, event, details, mac)"
            " VALUES (4, '2024-01-01 00:00:00.000000', 'U0EVIL', 'x', '{}', ?)",
            ("f" * 64,),
        )
    result = await audit.verify(db, key)
    assert (result.ok, result.first_bad_seq, result.rows) == (False, 4, 3)


def test_refused_statement_is_a_dbapi_error() -> None:
    assert issubclass(IntegrityError, DBAPIError)


# --------------------------------------------------------------------------- tampering behind the triggers


async def test_edit_is_detected(db: Database, key: bytes, db_path: Path) -> None:
    await _fill(db, key, 40)
    _tamper(db_path, "UPDATE audit_log SET details = '{\"n\":999}' WHERE seq = 17")
    assert await audit.verify(db, key) == VerifyResult(
        False, 16, 17, "row 17 does not match its MAC (edited?)"
    )


@pytest.mark.parametrize(
    "column, value",
    [
        ("actor", "U0EVIL"),
        ("event", "denied"),
        ("request_id", None),
        ("at", "2024-05-01 13:00:00.000000"),
        ("mac", "0" * 64),
    ],
)
async def test_edit_of_any_column_is_detected(
    db: Database, key: bytes, db_path: Path, column: str, value: Any
) -> None:
    await _fill(db, key, 20)
    _tamper(db_path, (f"UPDATE audit_log SET {column} = ? WHERE seq = 8", (value,)))
    result = await audit.verify(db, key)
    assert (result.ok, result.first_bad_seq, result.rows) == (False, 8, 7)


async def test_delete_is_detected(db: Database, key: bytes, db_path: Path) -> None:
    await _fill(db, key, 40)
    _tamper(db_path, "DELETE FROM audit_log WHERE seq = 17")
    assert await audit.verify(db, key) == VerifyResult(False, 16, 17, "sequence 17 is missing (deleted?)")


async def test_delete_of_several_is_detected(db: Database, key: bytes, db_path: Path) -> None:
    await _fill(db, key, 40)
    _tamper(db_path, "DELETE FROM audit_log WHERE seq BETWEEN 17 AND 19")
    result = await audit.verify(db, key)
    assert (result.first_bad_seq, result.problem) == (17, "sequences 17 to 19 are missing (deleted?)")


async def test_delete_of_first_row_is_detected(db: Database, key: bytes, db_path: Path) -> None:
    await _fill(db, key, 5)
    _tamper(db_path, "DELETE FROM audit_log WHERE seq = 1")
    assert await audit.verify(db, key) == VerifyResult(False, 0, 1, "sequence 1 is missing")


def _insert_forged(path: Path, at_seq: int, mac: str = "ab" * 32) -> None:
    con = sqlite3.connect(path)
    top = con.execute("SELECT MAX(seq) FROM audit_log").fetchone()[0]
    con.close()
    statements: list[tuple[str, tuple[Any, ...]] | str] = [
        (f"UPDATE audit_log SET seq = seq + 1 WHERE seq = {s}", ()) for s in range(top, at_seq - 1, -1)
    ]
    statements.append(
        (
            "INSERT INTO audit_log (seq, at, actor, event, request_id, details, mac)"
            " VALUES (?, '2024-05-01 12:00:16.500000', 'U0EVIL', 'approved', 'R000016', '{}', ?)",
            (at_seq, mac),
        )
    )
    _tamper(path, *statements)


async def test_insertion_in_the_middle_is_detected(db: Database, key: bytes, db_path: Path) -> None:
    await _fill(db, key, 40)
    _insert_forged(db_path, 17)
    assert await audit.verify(db, key) == VerifyResult(
        False, 16, 17, "row 17 is not part of the chain (inserted?)"
    )


async def test_insertion_with_a_copied_mac_is_detected(db: Database, key: bytes, db_path: Path) -> None:
    await _fill(db, key, 40)
    con = sqlite3.connect(db_path)
    mac16 = con.execute("SELECT mac FROM audit_log WHERE seq = 16").fetchone()[0]
    con.close()
    _insert_forged(db_path, 17, mac=mac16)
    result = await audit.verify(db, key)
    assert (result.ok, result.first_bad_seq) == (False, 17)


async def test_truncated_tail_is_not_detectable_by_the_chain(db: Database, key: bytes, db_path: Path) -> None:
    """Documented limit: a shorter chain is still a valid chain.

    What catches it is the head published elsewhere (Slack): the head after
    the truncation is not the one that was published.
    """
    await _fill(db, key, 40)
    async with db.read() as conn:
        published = await audit.head(conn)
    _tamper(db_path, "DELETE FROM audit_log WHERE seq > 30")
    assert await audit.verify(db, key) == VerifyResult(True, 30, None, None)
    async with db.read() as conn:
        now = await audit.head(conn)
    assert now[0] == 30 and now != published


async def test_tampering_across_a_chunk_boundary(db: Database, key: bytes, db_path: Path) -> None:
    """Rows are streamed in chunks of 10,000; the diagnosis may need the next chunk."""
    n = audit._CHUNK + 50
    await _fill(db, key, n, batch=5000)
    assert await audit.verify(db, key) == VerifyResult(True, n, None, None)
    _insert_forged(db_path, audit._CHUNK)
    assert await audit.verify(db, key) == VerifyResult(
        False, audit._CHUNK - 1, audit._CHUNK, f"row {audit._CHUNK} is not part of the chain (inserted?)"
    )


async def test_invalid_utf8_written_behind_our_back(db: Database, key: bytes, db_path: Path) -> None:
    await _fill(db, key, 30)
    _tamper(db_path, ("UPDATE audit_log SET actor = CAST(? AS TEXT) WHERE seq = 12", (b"U\xff\xfe",)))
    result = await audit.verify(db, key)
    assert (result.ok, result.first_bad_seq, result.rows) == (False, 12, 11)
    rows = [r async for r in audit.export(db)]
    assert len(rows) == 30


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "details",
    [
        {"token": "abc"},
        {"Token": "abc"},
        {"access_token": "abc"},
        {"accessToken": "abc"},
        {"bot-token": "abc"},
        {"secret": 1},
        {"client_secret": "x"},
        {"PASSWORD": "hunter2"},
        {"private_key": "-----BEGIN"},
        {"privateKey": "-----BEGIN"},
        {"deep": {"er": [{"x": 1}, {"Private_Key": "k"}]}},
        {"note": JWT},
        {"note": f"the token was {JWT}, oops"},
        {"list": ["a", ["b", JWT]]},
        {JWT: "as a key"},
        {"slack": "-".join(["xoxb", str(secrets.randbelow(10**10)).zfill(10), secrets.token_hex(6)])},
    ],
)
async def test_secrets_are_refused(db: Database, key: bytes, details: dict[str, Any]) -> None:
    async with db.transaction() as conn:
        with pytest.raises(ValueError) as info:
            await audit.append(conn, key, at=T0, actor="U1", event="issued", details=details)
        with pytest.raises(ValueError):  # one bad event refuses the whole batch
            await audit.append_many(conn, key, [_event(0), _event(1, details=details)])
        assert await audit.head(conn) == (0, "0" * 64)
    assert JWT not in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("field", ["actor", "event", "request_id"])
async def test_token_in_a_column_is_refused(db: Database, key: bytes, field: str) -> None:
    async with db.transaction() as conn:
        with pytest.raises(ValueError):
            await audit.append_many(conn, key, [_event(0, **{field: JWT[:16] + "." + JWT[-10:] + ".x"})])


async def test_facts_about_secrets_are_fine(db: Database, key: bytes) -> None:
    details = {
        "token_hash": "ab" * 32,
        "token_expires_at": T0 + timedelta(minutes=15),
        "jti": "4f1c9a0e8b7d6c5a4f3e2d1c0b9a8f7e",
        "kid": "2024-05-01",
        "secret_sha256": "cd" * 32,
        "private_key_id": "k1",
        "tokens_issued": 3,
    }
    async with db.transaction() as conn:
        assert await audit.append(conn, key, at=T0, actor="U1", event="issued", details=details) == 1
    [row] = [r async for r in audit.export(db)]
    assert row["details"]["token_expires_at"] == "2024-05-01T12:15:00.123456+00:00"


@pytest.mark.parametrize(
    "kw",
    [
        {"at": datetime(2024, 5, 1, 12, 0)},  # naive
        {"actor": ""},
        {"request_id": ""},
        {"details": {"x": float("nan")}},
        {"details": {"x": {1, 2}}},
    ],
)
async def test_bad_events_are_refused(db: Database, key: bytes, kw: dict[str, Any]) -> None:
    async with db.transaction() as conn:
        with pytest.raises((ValueError, TypeError)):
            await audit.append_many(conn, key, [_event(0, **kw)])


# --------------------------------------------------------------------------- export


async def test_export_since(db: Database, key: bytes) -> None:
    async with db.transaction() as conn:
        await audit.append_many(conn, key, [_event(i, at=T0 + timedelta(minutes=i)) for i in range(10)])
    everything = [r async for r in audit.export(db)]
    assert [r["seq"] for r in everything] == list(range(1, 11))
    since = T0 + timedelta(minutes=6)
    rows = [r async for r in audit.export(db, since=since)]
    assert [r["seq"] for r in rows] == [7, 8, 9, 10]
    assert rows == everything[6:]
    # the same instant in another zone, or naive (taken as UTC)
    plus2 = since.astimezone(timezone(timedelta(hours=2)))
    assert [r["seq"] async for r in audit.export(db, since=plus2)] == [7, 8, 9, 10]
    naive = since.replace(tzinfo=None)
    assert [r["seq"] async for r in audit.export(db, since=naive)] == [7, 8, 9, 10]
    assert [r async for r in audit.export(db, since=T0 + timedelta(days=1))] == []
    line = json.dumps(rows[0])
    assert json.loads(line) == {
        "seq": 7,
        "at": "2024-05-01T12:06:00.123456+00:00",
        "actor": "U00000006",
        "event": "issued",
        "request_id": None,
        "details": {"approvers": ["U1", "U2"], "n": 6, "scope": "payments-write"},
        "mac": rows[0]["mac"],
    }


async def test_reading_does_not_hold_the_write_lock(db: Database, key: bytes) -> None:
    """verify/export read in their own snapshot; writers are not queued behind them."""
    await _fill(db, key, audit._CHUNK + 10, batch=5000)
    rows = audit.export(db)
    first = await anext(rows)  # a cursor is open now
    assert first["seq"] == 1
    async with asyncio.timeout(10):  # busy_timeout is 30 s: this would block if locked
        async with db.transaction() as conn:
            await audit.append(conn, key, at=T0, actor="U1", event="x", details={})
    rest = [r["seq"] async for r in rows]
    assert rest[-1] == audit._CHUNK + 10  # the snapshot from before the write
    assert (await audit.verify(db, key)).rows == audit._CHUNK + 11


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_appends_are_gapless(db: Database, key: bytes) -> None:
    async def worker(w: int) -> list[int]:
        seqs = []
        for i in range(3):
            async with db.transaction() as conn:
                seqs.append(
                    await audit.append(
                        conn, key, at=datetime.now(UTC), actor=f"U{w:04d}", event="x", details={"i": i}
                    )
                )
                await asyncio.sleep(0)  # let the others pile up on the write lock
                seqs.append(
                    await audit.append(
                        conn, key, at=datetime.now(UTC), actor=f"U{w:04d}", event="y", details={"i": i}
                    )
                )
        return seqs

    results = await asyncio.gather(*(worker(w) for w in range(20)))
    for seqs in results:  # each transaction got two consecutive numbers
        assert all(seqs[j + 1] == seqs[j] + 1 for j in range(0, len(seqs), 2))
    assert sorted(s for seqs in results for s in seqs) == list(range(1, 121))
    assert await audit.verify(db, key) == VerifyResult(True, 120, None, None)


# --------------------------------------------------------------------------- properties

_json_scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=12)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_events = st.lists(
    st.builds(
        AuditEvent,
        at=st.datetimes(
            min_value=datetime(2000, 1, 1),
            max_value=datetime(2100, 1, 1),
            timezones=st.sampled_from(
                [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=30))]
            ),
        ),
        actor=st.text(min_size=1, max_size=64),
        event=st.text(min_size=1, max_size=32),
        details=st.dictionaries(st.text(max_size=8), _json, max_size=4),
        request_id=st.none() | st.text(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=12,
)


def _acceptable(ev: AuditEvent) -> bool:
    try:
        audit._prepare(ev)
    except ValueError:  # drew a key named like a secret, or a token-like string
        return False
    return True


async def _hypothesis_case(key: bytes, events: list[AuditEvent], pick: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.db"
        db = await _make_db(path)
        try:
            async with db.transaction() as conn:
                seqs = await audit.append_many(conn, key, events[: len(events) // 2])
            async with db.transaction() as conn:
                seqs += await audit.append_many(conn, key, events[len(events) // 2 :])
            assert seqs == list(range(1, len(events) + 1))
            assert await audit.verify(db, key) == VerifyResult(True, len(events), None, None)
            exported = [r async for r in audit.export(db)]
            prev = "0" * 64
            for r in exported:
                assert _auditor_mac(key, prev, r) == r["mac"]
                prev = r["mac"]

            # any single-byte change to any row's details is detected at that row
            seq = pick.draw(st.integers(1, len(events)), label="seq")
            con = sqlite3.connect(path)
            (details,) = con.execute("SELECT details FROM audit_log WHERE seq = ?", (seq,)).fetchone()
            con.close()
            raw = bytearray(details.encode())
            pos = pick.draw(st.integers(0, len(raw) - 1), label="pos")
            raw[pos] = pick.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]), label="byte")
            _tamper(path, ("UPDATE audit_log SET details = CAST(? AS TEXT) WHERE seq = ?", (bytes(raw), seq)))
            result = await audit.verify(db, key)
            assert (result.ok, result.first_bad_seq, result.rows) == (False, seq, seq - 1)
        finally:
            await db.dispose()


@settings(
    max_examples=int(os.environ.get("AUDIT_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(events=_events.filter(lambda evs: all(_acceptable(e) for e in evs)), pick=st.data())
def test_any_events_verify_and_any_byte_change_is_caught(
    key: bytes, events: list[AuditEvent], pick: st.DataObject
) -> None:
    asyncio.run(_hypothesis_case(key, events, pick))


# --------------------------------------------------------------------------- PostgreSQL (opt-in)

@pytest.fixture
async def pg(postgres: Any) -> AsyncIterator[Database]:
    name = postgres.create_empty()
    d = Database(postgres.url(name))
    await d.create_schema()
    await d.create_schema()  # idempotent
    yield d
    await d.dispose()
    postgres.drop(name)


async def test_pg_chain_export_and_refusals(pg: Database, key: bytes) -> None:
    async with pg.transaction() as conn:
        assert await audit.append_many(conn, key, [_event(i) for i in range(10)]) == list(range(1, 11))
        assert await audit.append(conn, key, at=T0, actor="U1", event="x", details={"é": "ü"}) == 11
    assert await audit.verify(pg, key) == VerifyResult(True, 11, None, None)
    rows = [r async for r in audit.export(pg)]
    prev = "0" * 64
    for r in rows:
        assert _auditor_mac(key, prev, r) == r["mac"]
        prev = r["mac"]
    assert [r["seq"] async for r in audit.export(pg, since=T0 + timedelta(seconds=8))] == [9, 10]
    for sql in [
        "UPDATE audit_log SET actor = 'U0EVIL' WHERE seq = 2",
        "DELETE FROM audit_log WHERE seq = 3",
        "TRUNCATE audit_log",
        "INSERT INTO audit_log (seq, at, actor, event, details, mac)"
        " VALUES (13, now(), 'U0', 'x', '{}', 'f')",
        "INSERT INTO audit_log (seq, at, actor, event, details, mac) VALUES (2, now(), 'U0', 'x', '{}', 'f')"
        " ON CONFLICT (seq) DO UPDATE SET actor = 'U0EVIL'",
    ]:
        with pytest.raises(IntegrityError, match="append-only"):
            async with pg.transaction() as conn:
                await conn.execute(text(sql))
    assert await audit.verify(pg, key) == VerifyResult(True, 11, None, None)

    # an owner can switch the triggers off; the chain still tells
    async with pg.transaction() as conn:
        await conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        await conn.exec_driver_sql("""UPDATE audit_log SET details = '{"n":999}' WHERE seq = 4""")
        await conn.execute(text("DELETE FROM audit_log WHERE seq = 7"))
        await conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))
    assert await audit.verify(pg, key) == VerifyResult(False, 3, 4, "row 4 does not match its MAC (edited?)")


async def test_pg_concurrent_appends_are_gapless(pg: Database, key: bytes) -> None:
    async def worker(w: int) -> list[int]:
        async with pg.transaction() as conn:
            a = await audit.append(conn, key, at=datetime.now(UTC), actor=f"U{w}", event="x", details={})
            await asyncio.sleep(0.001)
            b = await audit.append(conn, key, at=datetime.now(UTC), actor=f"U{w}", event="y", details={})
        return [a, b]

    results = await asyncio.gather(*(worker(w) for w in range(20)))
    assert all(b == a + 1 for a, b in results)
    assert sorted(s for r in results for s in r) == list(range(1, 41))
    assert await audit.verify(pg, key) == VerifyResult(True, 40, None, None)
