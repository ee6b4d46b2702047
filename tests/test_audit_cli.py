"""`breakglass audit verify | export` on a log written by a real flow, then tampered
with by someone who went around the database's triggers (stdlib sqlite3); and
the published head that catches what the chain alone cannot (tail cut, rewrite)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from bot import audit
from bot.core.clock import ManualClock
from bot.core.tokens import SigningKey, generate_private_key
from bot.delivery.audit_publish import EVENT, check_head, lane, publish_head, published_heads
from bot.keys import sealed_secret
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, MALLORY, REVIEWS, Sandbox
from bot.runtime import AUDIT_KEY_NAME
from bot.store.db import Database
from bot.store.schema import outbox as outbox_table

JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
TRIGGERS = ("audit_log_no_update", "audit_log_no_delete", "audit_log_next_seq")
# Checkpoints are signed with the bot's signing key; these tests check the head itself.
SIGNER = SigningKey("bg-test", "EdDSA", (_private := generate_private_key("EdDSA")),
                    _private.public_key())


@dataclass(frozen=True)
class Flow:
    db_path: Path
    master: str
    rows: int
    token: str


async def _real_flow(directory: Path) -> Flow:
    box = Sandbox(directory=directory)
    await box.start()
    try:
        slack, emu = box.slack, box.emulator
        await slack.command(MALLORY, "payments-write 30m INC-1 let me in")
        await slack.command(ALICE, "payments-write 30m INC-4521 auth down, refunds stuck")
        await box.settle()
        rid = box.latest_request_id()
        for who in (ALICE, BOB, BOB, CAROL):  # own click refused, double click refused
            await slack.click(who, "bg_approve", rid, channel_id=REVIEWS)
            await box.settle()
        await slack.click(ALICE, "bg_reveal", rid, channel_id=emu.dm_channel_for(ALICE))
        await box.settle()
        token = JWT_RE.search(json.dumps(emu.views[-1].view)).group(0)  # type: ignore[union-attr]
        auth = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
        async with aiohttp.ClientSession() as s, s.post(
                f"{box.url}/oauth2/introspect", data={"token": token},
                headers={"Authorization": f"Basic {auth}"}) as resp:
            assert (await resp.json())["active"] is True
        await slack.command(BOB, f"revoke {rid}")
        await box.settle()
        async with box.bot.db.read() as conn:
            rows, _ = await audit.head(conn)
    finally:
        await box.stop_bot()
        await box.probes.stop()
        await box.emulator.stop()
    return Flow(directory / "breakglass.db", box.master_key, rows, token)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    directory = tmp_path_factory.mktemp("flow")
    made = asyncio.run(_real_flow(directory))
    with contextlib.closing(sqlite3.connect(made.db_path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    yield made


def copy_db(flow: Flow, to: Path) -> Path:
    target = to / "copy.db"
    shutil.copyfile(flow.db_path, target)
    return target


def url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def tamper(path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """What someone with the file and sqlite3 can do: drop the triggers, change rows."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        for name in TRIGGERS:
            db.execute(f"DROP TRIGGER IF EXISTS {name}")
        for i, sql in enumerate(statements):
            db.execute(sql, params if i == len(statements) - 1 else ())
        db.commit()


async def cli(path: Path, master: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    env.update(BREAKGLASS_DATABASE_URL=url(path), BREAKGLASS_MASTER_KEY=master)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "audit", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rows_of(path: Path) -> list[tuple[int, str, str, str, str | None, str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.execute(
            "SELECT seq, at, actor, event, request_id, details, mac FROM audit_log ORDER BY seq"))


# --------------------------------------------------------------------------- verify


async def test_verify_passes_on_the_log_of_a_real_flow(flow: Flow, tmp_path: Path) -> None:
    path = copy_db(flow, tmp_path)
    code, out, err = await cli(path, flow.master, "verify")
    assert (code, err) == (0, "")
    assert out.strip() == f"audit log intact: {flow.rows} row(s)"
    events = [r[3] for r in rows_of(path)]
    for event in ("started", "refused", "requested", "approved", "issued", "revealed", "used",
                  "revoked"):
        assert event in events, event


@dataclass(frozen=True)
class Case:
    name: str
    statements: tuple[str, ...]
    bad_seq: int
    words: str  # in the message


def _cases(n: int) -> list[Case]:
    return [
        Case("edit details", ("UPDATE audit_log SET details = replace(details, '}', "
                              "',\"x\":1}') WHERE seq = 4",), 4, "edited"),
        Case("edit actor", ("UPDATE audit_log SET actor = 'U0MALLORY' WHERE seq = 7",), 7, "edited"),
        Case("edit event", (f"UPDATE audit_log SET event = 'approved' WHERE seq = {n - 1}",),
             n - 1, "edited"),
        Case("edit time", ("UPDATE audit_log SET at = '2020-01-01 00:00:00.000000' WHERE seq = 3",),
             3, "edited"),
        Case("edit request id", ("UPDATE audit_log SET request_id = NULL WHERE seq = 5",), 5,
             "edited"),
        Case("edit a mac", ("UPDATE audit_log SET mac = '" + "ab" * 32 + "' WHERE seq = 6",), 6,
             "edited"),
        Case("delete a row", ("DELETE FROM audit_log WHERE seq = 5",), 5, "missing"),
        Case("delete two rows", ("DELETE FROM audit_log WHERE seq IN (8, 9)",), 8, "missing"),
        Case("delete the first row", ("DELETE FROM audit_log WHERE seq = 1",), 1, "missing"),
        Case("insert in the middle", (
            "UPDATE audit_log SET seq = -seq WHERE seq > 5",
            "UPDATE audit_log SET seq = 1 - seq WHERE seq < 0",
            "INSERT INTO audit_log (seq, at, actor, event, request_id, details, mac) "
            "SELECT 6, at, 'U0MALLORY', 'approved', request_id, details, '" + "cd" * 32 + "' "
            "FROM audit_log WHERE seq = 5"), 6, "inserted"),
        Case("append a forged row", (
            "INSERT INTO audit_log (seq, at, actor, event, request_id, details, mac) "
            f"SELECT seq + 1, at, actor, 'issued', request_id, details, '{'ef' * 32}' "
            f"FROM audit_log WHERE seq = {n}",), n + 1, "edited"),
        Case("swap two rows", (
            "UPDATE audit_log SET seq = -1 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = 5",
            "UPDATE audit_log SET seq = 5 WHERE seq = -1"), 4, ""),
    ]


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: Path,
             master: str, *args: str) -> tuple[int, str, str]:
    """The same CLI in this process (no interpreter start-up): bot.cli.main(argv)."""
    from bot.cli import main

    monkeypatch.setenv("BREAKGLASS_DATABASE_URL", url(path))
    monkeypatch.setenv("BREAKGLASS_MASTER_KEY", master)
    capsys.readouterr()
    code = main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def tampered_copies(flow: Flow, tmp_path: Path) -> list[tuple[Case, Path]]:
    made = []
    for i, case in enumerate(_cases(flow.rows)):
        d = tmp_path / f"case{i}"
        d.mkdir()
        path = copy_db(flow, d)
        tamper(path, *case.statements)
        made.append((case, path))
    return made


def check_verdict(case: Case, code: int, out: str, err: str) -> None:
    assert code == 1, f"{case.name}: {out}{err}"
    assert out.startswith(f"audit log broken at sequence {case.bad_seq}:"), (case.name, out)
    assert case.words in out, (case.name, out)
    assert "Traceback" not in err


def test_verify_names_the_first_bad_sequence_after_tampering(
        flow: Flow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for case, path in tampered_copies(flow, tmp_path):
        check_verdict(case, *run_main(monkeypatch, capsys, path, flow.master, "verify"))


async def test_python_m_bot_audit_verify_exits_1_on_edit_delete_insert(flow: Flow,
                                                                        tmp_path: Path) -> None:
    chosen = [(c, p) for c, p in tampered_copies(flow, tmp_path)
              if c.name in ("edit details", "delete a row", "insert in the middle")]
    assert len(chosen) == 3
    results = await asyncio.gather(*(cli(p, flow.master, "verify") for _, p in chosen))
    for (case, _), result in zip(chosen, results, strict=True):
        check_verdict(case, *result)


async def test_the_database_refuses_changes_while_its_triggers_stand(flow: Flow,
                                                                     tmp_path: Path) -> None:
    path = copy_db(flow, tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        for sql in ("UPDATE audit_log SET actor = 'x' WHERE seq = 2",
                    "DELETE FROM audit_log WHERE seq = 2",
                    "INSERT OR REPLACE INTO audit_log SELECT * FROM audit_log WHERE seq = 2",
                    "INSERT INTO audit_log (seq, at, actor, event, details, mac) "
                    "VALUES (1000000, '2024-01-01 00:00:00.000000', 'a', 'b', '{}', 'c')"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(sql)
    code, out, _ = await cli(path, flow.master, "verify")
    assert code == 0, out


async def test_cutting_the_tail_passes_verify_but_not_the_published_head(
        flow: Flow, tmp_path: Path) -> None:
    path = copy_db(flow, tmp_path)
    db = Database(url(path))
    try:
        key = await sealed_secret(db, flow.master, AUDIT_KEY_NAME)
        published = await publish_head(db, key, ManualClock(), INCIDENT, SIGNER, force=True)
        assert published is not None and published.seq == flow.rows
        assert await check_head(db, published.seq, published.mac) is None
    finally:
        await db.dispose()
    tamper(path, f"DELETE FROM audit_log WHERE seq >= {flow.rows - 1}")
    code, out, _ = await cli(path, flow.master, "verify")
    assert code == 0  # the chain alone cannot tell: a shorter log is still a valid chain
    assert out.strip() == f"audit log intact: {flow.rows - 2} row(s)"
    db = Database(url(path))
    try:
        problem = await check_head(db, published.seq, published.mac)
    finally:
        await db.dispose()
    assert problem is not None and f"ends at {flow.rows - 2}" in problem


async def test_a_chain_rewritten_with_the_key_passes_verify_but_not_the_published_head(
        flow: Flow, tmp_path: Path) -> None:
    path = copy_db(flow, tmp_path)
    db = Database(url(path))
    try:
        key = await sealed_secret(db, flow.master, AUDIT_KEY_NAME)
        head = await publish_head(db, key, ManualClock(), INCIDENT, SIGNER, force=True)
        assert head is not None
    finally:
        await db.dispose()
    # An insider with the MAC key removes mallory's refusal and re-chains every row.
    rows = [r for r in rows_of(path) if not (r[3] == "refused" and r[2] == MALLORY)]
    assert len(rows) < len(rows_of(path))
    with contextlib.closing(sqlite3.connect(path)) as raw:
        for name in TRIGGERS:
            raw.execute(f"DROP TRIGGER {name}")
        raw.execute("DELETE FROM audit_log")
        prev = audit.GENESIS_MAC
        for seq, (_, at, actor, event, request_id, details, _mac) in enumerate(rows, start=1):
            canonical = at[:10] + "T" + at[11:] + "+00:00"
            prev = audit.compute_mac(key, prev, seq, canonical, actor, event, request_id, details)
            raw.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (seq, at, actor, event, request_id, details, prev))
        raw.commit()
    code, out, _ = await cli(path, flow.master, "verify")
    assert code == 0, out  # a perfect forgery, as far as the chain can tell
    db = Database(url(path))
    try:
        problem = await check_head(db, head.seq, head.mac)
    finally:
        await db.dispose()
    assert problem is not None


async def test_verify_with_the_wrong_master_key_is_a_clear_exit_2(flow: Flow,
                                                                   tmp_path: Path) -> None:
    from bot.core.kdf import new_master_key

    path = copy_db(flow, tmp_path)
    code, out, err = await cli(path, new_master_key(), "verify")
    assert code == 2 and "Traceback" not in err and err.strip()


# --------------------------------------------------------------------------- export


async def test_export_writes_every_row_as_json_lines(flow: Flow, tmp_path: Path) -> None:
    path = copy_db(flow, tmp_path)
    code, out, err = await cli(path, flow.master, "export")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == flow.rows
    stored = rows_of(path)
    for line, row in zip(lines, stored, strict=True):
        obj = json.loads(line)
        assert set(obj) == {"seq", "at", "actor", "event", "request_id", "details", "mac"}
        assert obj["seq"] == row[0] and obj["mac"] == row[6] and obj["actor"] == row[2]
        assert audit.canonical_details(obj["details"]) == row[5]  # the MACed text, re-made
        assert obj["at"].endswith("+00:00") and datetime.fromisoformat(obj["at"]).tzinfo
    assert flow.token not in out and not JWT_RE.search(out) and "xoxb-" not in out
    assert "INC-4521" in out  # the reason and incident are there; the token is not


def test_export_since_keeps_rows_at_or_after_the_time(
        flow: Flow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = copy_db(flow, tmp_path)

    def export(*args: str) -> tuple[int, str, str]:
        return run_main(monkeypatch, capsys, path, flow.master, "export", *args)

    _, everything, _ = export()
    rows = [json.loads(line) for line in everything.splitlines()]
    assert len(rows) == flow.rows
    middle = rows[len(rows) // 2]["at"]
    zulu = middle.replace("+00:00", "Z")
    naive = middle.replace("+00:00", "")  # naive means UTC
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    (c1, since, _), (c2, since_z, _), (c3, since_naive, _), (c4, none, _), (c5, _, bad) = (
        export("--since", middle), export("--since", zulu), export("--since", naive),
        export("--since", future), export("--since", "yesterday-ish"))
    assert (c1, c2, c3, c4, c5) == (0, 0, 0, 0, 2)
    kept = [json.loads(line) for line in since.splitlines()]
    cut = datetime.fromisoformat(middle)
    assert kept == [r for r in rows if datetime.fromisoformat(r["at"]) >= cut]
    assert 0 < len(kept) < len(rows)
    assert since_z == since == since_naive and none == ""
    assert "--since" in bad and "Traceback" not in bad


# --------------------------------------------------------------------------- publishing the head


async def test_publish_head_hourly_and_every_n_events(flow: Flow, tmp_path: Path) -> None:
    path = copy_db(flow, tmp_path)
    db = Database(url(path))
    try:
        key = await sealed_secret(db, flow.master, AUDIT_KEY_NAME)
        clock = ManualClock(datetime.now(UTC))
        woken: list[int] = []
        kw = {"every_events": 5, "every": timedelta(hours=1), "wake": lambda: woken.append(1)}

        # Never published, and more than 5 rows: due by count.
        first = await publish_head(db, key, clock, INCIDENT, SIGNER, **kw)
        assert first is not None and first.seq == flow.rows and woken == [1]
        assert await publish_head(db, key, clock, INCIDENT, SIGNER, **kw) is None  # nothing new
        clock.advance(timedelta(hours=2))
        assert await publish_head(db, key, clock, INCIDENT, SIGNER, **kw) is None  # still nothing new

        async def log(n: int) -> None:
            async with db.transaction() as conn:
                await audit.append_many(conn, key, [
                    audit.AuditEvent(clock.now(), "U0ALICE", "refused", {"i": i})
                    for i in range(n)])

        await log(2)  # the first rows after an idle hour go out at once
        after_idle = await publish_head(db, key, clock, INCIDENT, SIGNER, **kw)
        assert after_idle is not None and after_idle.seq == first.seq + 1 + 2
        await log(2)
        assert await publish_head(db, key, clock, INCIDENT, SIGNER, **kw) is None  # 2 < 5, < 1 h
        clock.advance(timedelta(minutes=59))
        assert await publish_head(db, key, clock, INCIDENT, SIGNER, **kw) is None
        clock.advance(timedelta(minutes=2))
        hourly = await publish_head(db, key, clock, INCIDENT, SIGNER, **kw)
        assert hourly is not None and hourly.seq == after_idle.seq + 1 + 2
        await log(4)
        assert await publish_head(db, key, clock, INCIDENT, SIGNER, **kw) is None
        await log(1)
        by_count = await publish_head(db, key, clock, INCIDENT, SIGNER, **kw)
        assert by_count is not None and by_count.seq == hourly.seq + 1 + 5

        assert await published_heads(db) == [(h.seq, h.mac) for h in (first, after_idle, hourly, by_count)]
        for h in (first, after_idle, hourly, by_count):
            assert await check_head(db, h.seq, h.mac) is None
        async with db.read() as conn:
            posts = [json.loads(p)["text"] for (p,) in (await conn.execute(
                outbox_table.select().with_only_columns(outbox_table.c.payload)
                .where(outbox_table.c.lane == lane(INCIDENT)).order_by(outbox_table.c.id))).all()]
        checkpoints = [p for p in posts if "Audit checkpoint" in p]
        assert len(checkpoints) == 4
        assert f"sequence {by_count.seq}" in checkpoints[-1] and by_count.mac in checkpoints[-1]
        result = await audit.verify(db, key)
        assert result.ok
    finally:
        await db.dispose()


async def test_publish_head_on_a_young_small_log_waits(tmp_path: Path) -> None:
    db = Database(url(tmp_path / "young.db"))
    await db.create_schema()
    try:
        key = secrets.token_bytes(32)
        clock = ManualClock(datetime.now(UTC))
        assert await publish_head(db, key, clock, INCIDENT, SIGNER) is None  # empty log
        async with db.transaction() as conn:
            await audit.append(conn, key, at=clock.now(), actor="breakglass", event="started",
                               details={})
        assert await publish_head(db, key, clock, INCIDENT, SIGNER) is None  # 1 row, 0 minutes
        clock.advance(timedelta(hours=1))
        head = await publish_head(db, key, clock, INCIDENT, SIGNER)
        assert head is not None and head.seq == 1
    finally:
        await db.dispose()


async def test_two_processes_publish_one_head(flow: Flow, tmp_path: Path) -> None:
    path = copy_db(flow, tmp_path)
    dbs = [Database(url(path)) for _ in range(4)]
    try:
        key = await sealed_secret(dbs[0], flow.master, AUDIT_KEY_NAME)
        clock = ManualClock(datetime.now(UTC) + timedelta(hours=2))
        results = await asyncio.gather(*(publish_head(d, key, clock, INCIDENT, SIGNER) for d in dbs))
        assert sum(r is not None for r in results) == 1
        assert len(await published_heads(dbs[0])) == 1
    finally:
        for d in dbs:
            await d.dispose()


async def test_the_published_head_reaches_the_incident_channel(tmp_path: Path) -> None:
    box = Sandbox(directory=tmp_path)
    await box.start()
    try:
        await box.slack.command(ALICE, "payments-write 30m INC-3 checkpoint me")
        await box.settle()
        rt = box.bot
        head = await publish_head(rt.db, rt.audit_key, rt.clock, INCIDENT, rt.keyring.current, force=True,
                                  wake=rt.dispatcher.wake)
        assert head is not None
        await box.settle()
        [post] = [m for m in box.emulator.messages(INCIDENT) if "Audit checkpoint" in m.text]
        assert f"sequence {head.seq}" in post.text and head.mac in post.text
        events = [r["event"] async for r in audit.export(rt.db)]
        assert events[-1] == EVENT
        assert (await audit.verify(rt.db, rt.audit_key)).ok
    finally:
        await box.stop()
