"""Audit log throughput, each against a baseline measured in the same run.

    python bench/audit.py [--write-docs] [--rows 1000000] [--append-rows 200000] [--batch 500]

1. Append rate: `bot.audit.append_many` (validation, canonical JSON, the MAC
   chain, one executemany per batch inside a BEGIN IMMEDIATE transaction)
   against a raw aiosqlite insert loop (one INSERT per row) writing the same
   rows, in the same transactions, into the same table (triggers included),
   with the MACs already computed. Target: >= 0.5x the raw rate. A stricter
   baseline, a raw aiosqlite executemany of the same batches (no per-row
   await at all), is shown too.
2. Verify: `bot.audit.verify` over a 1,000,000-row log against a raw walk of
   the same chain with the standard library only (sqlite3 cursor, hmac per
   row, the documented MAC input). Target: <= 1.3x its time. A stricter raw
   walk (the same precomputed-HMAC-state trick verify uses) and the
   end-to-end `python -m bot audit verify` are shown for reference.

Each measurement is run several times, alternating, and the best is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import io
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot import audit  # noqa: E402
from bot.core.kdf import new_master_key  # noqa: E402
from bot.keys import sealed_secret  # noqa: E402
from bot.runtime import AUDIT_KEY_NAME  # noqa: E402
from bot.store.db import Database  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EVENTS = ["requested", "approved", "approved", "issued", "revealed", "used", "expired", "refused"]


def event(i: int) -> audit.AuditEvent:
    """A realistic row: the shapes the service writes, ~150 bytes of details."""
    kind = EVENTS[i % len(EVENTS)]
    rid = f"R{i // 8:07d}"
    details: dict[str, Any] = {"scope": "payments-write"}
    if kind == "requested":
        details.update(ttl_s=1800, requested_ttl_s=1800, incident=f"INC-{i}",
                       reason="INC-4521 auth provider down, refunds stuck",
                       triggers=[{"name": "primary-auth-down", "holds": True, "detail": "HTTP 503"}])
    elif kind == "issued":
        details.update(approvers=["U0BOB", "U0CAROL"], kid="bg-abcdefghijkl",
                       jti=f"{i:032x}", expires_at="2026-01-01T00:30:00.000000+00:00")
    elif kind == "refused":
        details.update(code="not_an_approver", action="approve")
    return audit.AuditEvent(at=T0 + timedelta(microseconds=i * 997), actor=f"U0USER{i % 40:03d}",
                            event=kind, details=details, request_id=rid)


def sqlite_tuning(con: sqlite3.Connection) -> None:
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")


# --------------------------------------------------------------------------- append


async def fresh_db(path: Path) -> Database:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.create_schema()
    return db


async def bench_append_many(path: Path, key: bytes, events: list[audit.AuditEvent],
                            batch: int) -> float:
    db = await fresh_db(path)
    try:
        start = time.perf_counter()
        for i in range(0, len(events), batch):
            async with db.transaction() as conn:
                await audit.append_many(conn, key, events[i:i + batch])
        return time.perf_counter() - start
    finally:
        await db.dispose()


async def bench_raw_insert(path: Path, rows: list[tuple[Any, ...]], batch: int) -> float:
    """The ceiling: the same rows, MACs precomputed, plain aiosqlite executemany per batch."""
    db = await fresh_db(path)  # same schema and triggers
    await db.dispose()
    async with aiosqlite.connect(path, isolation_level=None) as con:
        await con.execute("PRAGMA journal_mode=WAL")
        await con.execute("PRAGMA synchronous=NORMAL")
        start = time.perf_counter()
        for i in range(0, len(rows), batch):
            await con.execute("BEGIN IMMEDIATE")
            await con.executemany(
                "INSERT INTO audit_log (seq, at, actor, event, request_id, details, mac) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", rows[i:i + batch])
            await con.execute("COMMIT")
        return time.perf_counter() - start


async def bench_raw_loop(path: Path, rows: list[tuple[Any, ...]], batch: int) -> float:
    """The literal raw insert loop: one aiosqlite execute per row, committed per batch."""
    db = await fresh_db(path)
    await db.dispose()
    async with aiosqlite.connect(path, isolation_level=None) as con:
        await con.execute("PRAGMA journal_mode=WAL")
        await con.execute("PRAGMA synchronous=NORMAL")
        start = time.perf_counter()
        for i in range(0, len(rows), batch):
            await con.execute("BEGIN IMMEDIATE")
            for row in rows[i:i + batch]:
                await con.execute("INSERT INTO audit_log (seq, at, actor, event, request_id, "
                                  "details, mac) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            await con.execute("COMMIT")
        return time.perf_counter() - start


async def bench_single(path: Path, key: bytes, events: list[audit.AuditEvent],
                       rows: list[tuple[Any, ...]]) -> tuple[float, float]:
    """One event per transaction (how the service appends), both ways."""
    db = await fresh_db(path)
    try:
        start = time.perf_counter()
        for ev in events:
            async with db.transaction() as conn:
                await audit.append_many(conn, key, [ev])
        ours = time.perf_counter() - start
    finally:
        await db.dispose()
    db = await fresh_db(path)
    await db.dispose()
    async with aiosqlite.connect(path, isolation_level=None) as con:
        await con.execute("PRAGMA journal_mode=WAL")
        await con.execute("PRAGMA synchronous=NORMAL")
        start = time.perf_counter()
        for row in rows:
            await con.execute("BEGIN IMMEDIATE")
            await con.execute("INSERT INTO audit_log (seq, at, actor, event, request_id, details, "
                              "mac) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            await con.execute("COMMIT")
        raw = time.perf_counter() - start
    return ours, raw


def stored_rows(key: bytes, events: list[audit.AuditEvent]) -> list[tuple[Any, ...]]:
    """The rows append_many would write, as SQLite stores them."""
    out = []
    prev = audit.GENESIS_MAC
    for seq, ev in enumerate(events, start=1):
        at = ev.at.astimezone(UTC)
        canonical = audit.canonical_time(at)
        details = audit.canonical_details(ev.details)
        prev = audit.compute_mac(key, prev, seq, canonical, ev.actor, ev.event, ev.request_id,
                                 details)
        out.append((seq, at.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds"),
                    ev.actor, ev.event, ev.request_id, details, prev))
    return out


# --------------------------------------------------------------------------- verify


def build_log(path: Path, key: bytes, n: int) -> None:
    """n chained rows, written with sqlite3 (the triggers stay on and check every seq)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as con:
        sqlite_tuning(con)
        chunk = 50_000
        prev = audit.GENESIS_MAC
        for start in range(0, n, chunk):
            rows = []
            for i in range(start, min(n, start + chunk)):
                ev = event(i)
                seq = i + 1
                at = ev.at.astimezone(UTC)
                details = audit.canonical_details(ev.details)
                prev = audit.compute_mac(key, prev, seq, audit.canonical_time(at), ev.actor,
                                         ev.event, ev.request_id, details)
                rows.append((seq, at.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds"),
                             ev.actor, ev.event, ev.request_id, details, prev))
            con.execute("BEGIN IMMEDIATE")
            con.executemany("INSERT INTO audit_log (seq, at, actor, event, request_id, details, "
                            "mac) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            con.execute("COMMIT")


def _field(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"%d:%b," % (len(b), b)


def raw_walk(path: Path, key: bytes) -> int:
    """The baseline: stdlib sqlite3 + stdlib hmac, the documented MAC input, row by row."""
    prev = audit.GENESIS_MAC
    expected = 1
    with closing(sqlite3.connect(path)) as con:
        cur = con.execute("SELECT seq, at, actor, event, request_id, details, mac "
                          "FROM audit_log ORDER BY seq")
        for seq, at, actor, event_, request_id, details, mac in cur:
            if seq != expected:
                raise SystemExit(f"raw walk: gap at {expected}")
            at_iso = at[:10] + "T" + at[11:] + "+00:00"
            msg = b"".join((prev.encode(), _field(str(seq)), _field(at_iso), _field(actor),
                            _field(event_), _field(request_id or ""), _field(details)))
            if not hmac.compare_digest(hmac.digest(key, msg, "sha256").hex(), mac):
                raise SystemExit(f"raw walk: bad MAC at {seq}")
            prev = mac
            expected += 1
    return expected - 1


def raw_walk_strict(path: Path, key: bytes) -> int:
    """A raw walk with verify's own tricks (prepared HMAC states, one f-string per row)."""
    k = key.ljust(64, b"\0") if len(key) <= 64 else hashlib.sha256(key).digest().ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in k))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in k))
    prev = audit.GENESIS_MAC
    expected = 1
    with closing(sqlite3.connect(path)) as con:
        cur = con.execute("SELECT seq, at, actor, event, request_id, details, mac "
                          "FROM audit_log ORDER BY seq")
        while rows := cur.fetchmany(10_000):
            for seq, at, actor, event_, request_id, details, mac in rows:
                if seq != expected:
                    raise SystemExit(f"strict walk: gap at {expected}")
                at = at[:10] + "T" + at[11:] + "+00:00"
                rid = request_id or ""
                s = str(seq)
                msg = (f"{prev}{len(s)}:{s},{len(at)}:{at},{len(actor)}:{actor},"
                       f"{len(event_)}:{event_},{len(rid)}:{rid},{len(details)}:{details},").encode()
                h = inner.copy()
                h.update(msg)
                o = outer.copy()
                o.update(h.digest())
                if o.hexdigest() != mac:
                    raise SystemExit(f"strict walk: bad MAC at {seq}")
                prev = mac
                expected += 1
    return expected - 1


async def ours_verify(path: Path, key: bytes) -> int:
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        result = await audit.verify(db, key)
    finally:
        await db.dispose()
    if not result.ok:
        raise SystemExit(f"audit.verify: {result}")
    return result.rows


def best(runs: list[float]) -> float:
    return min(runs)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    key = os.urandom(32)
    ok = True
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, "
          f"{os.cpu_count()} CPU(s); temp dir {tmp}")

    # 1. append
    n, batch = args.append_rows, args.batch
    events = [event(i) for i in range(n)]
    rows = stored_rows(key, events)
    ours_runs, raw_runs, many_runs = [], [], []
    for _ in range(args.repeat):
        raw_runs.append(await bench_raw_loop(tmp / "raw.db", rows, batch))
        many_runs.append(await bench_raw_insert(tmp / "many.db", rows, batch))
        ours_runs.append(await bench_append_many(tmp / "ours.db", key, events, batch))
    ours_rate, raw_rate = n / best(ours_runs), n / best(raw_runs)
    many_rate = n / best(many_runs)
    ratio = ours_rate / raw_rate
    ok &= ratio >= 0.5
    print(f"append, {n:,} rows, {batch} per transaction:")
    print(f"  audit.append_many (validate, canonical JSON, MAC chain, one executemany)"
          f"  {ours_rate:>9,.0f} rows/s")
    print(f"  raw aiosqlite insert loop (one execute per row, MACs precomputed)"
          f"         {raw_rate:>9,.0f} rows/s")
    print(f"  ratio {ratio:.2f}x (target >= 0.5x) {'OK' if ratio >= 0.5 else 'MISSED'}")
    print(f"  stricter: raw aiosqlite executemany of the same batches {many_rate:,.0f} rows/s; "
          f"append_many is {ours_rate / many_rate:.2f}x of that")
    single_n = min(2000, n)
    s_ours, s_raw = await bench_single(tmp / "single.db", key, events[:single_n], rows[:single_n])
    print(f"  for reference, one event per transaction ({single_n:,} rows): "
          f"{single_n / s_ours:,.0f} vs {single_n / s_raw:,.0f} rows/s raw "
          f"({s_raw / s_ours:.2f}x)")

    # 2. verify
    big = tmp / "big.db"
    master = new_master_key()
    db = await fresh_db(big)
    try:
        vkey = await sealed_secret(db, master, AUDIT_KEY_NAME)  # what the CLI will use
    finally:
        await db.dispose()
    t = time.perf_counter()
    build_log(big, vkey, args.rows)
    print(f"verify, {args.rows:,} rows ({big.stat().st_size / 2**20:.0f} MiB, built in "
          f"{time.perf_counter() - t:.1f}s):")
    assert raw_walk(big, vkey) == args.rows  # warm the page cache, check the baseline agrees
    ours_t, raw_t, strict_t = [], [], []
    for _ in range(args.repeat):
        raw_t.append(timed(lambda: raw_walk(big, vkey)))
        ours_t.append(await _atimed(ours_verify(big, vkey)))
        strict_t.append(timed(lambda: raw_walk_strict(big, vkey)))
    o, r, s = best(ours_t), best(raw_t), best(strict_t)
    vratio = o / r
    ok &= vratio <= 1.3
    print(f"  audit.verify             {o:6.2f}s  ({args.rows / o:,.0f} rows/s)")
    print(f"  raw sqlite3 + hmac walk  {r:6.2f}s  ({args.rows / r:,.0f} rows/s)")
    print(f"  ratio {vratio:.2f}x its time (target <= 1.3x) {'OK' if vratio <= 1.3 else 'MISSED'}")
    print(f"  for reference: a raw walk with verify's own HMAC tricks {s:.2f}s ({o / s:.2f}x)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BREAKGLASS_")}
    env.update(BREAKGLASS_DATABASE_URL=f"sqlite+aiosqlite:///{big}", BREAKGLASS_MASTER_KEY=master)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bot", "audit", "verify"], env=env,
                          capture_output=True, text=True, check=False)
    cli = time.perf_counter() - t
    print(f"  `python -m bot audit verify`, end to end (interpreter start included): {cli:.2f}s, "
          f"exit {done.returncode}: {done.stdout.strip()}")
    ok &= done.returncode == 0
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return 0 if ok else 1


async def _atimed(coro: Any) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


def cli_main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the verified log")
    p.add_argument("--append-rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=500, help="events per append_many transaction")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    p.add_argument("--write-docs", action="store_true",
                   help="replace the audit section of docs/performance.md")
    args = p.parse_args()
    out = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            sys.__stdout__.write(s)
            sys.__stdout__.flush()
            return out.write(s)

    with redirect_stdout(Tee()):
        code = asyncio.run(main(args))
    if args.write_docs:
        from _common import write_section

        write_section("audit", out.getvalue(), "python bench/audit.py")
    return code


if __name__ == "__main__":
    raise SystemExit(cli_main())
