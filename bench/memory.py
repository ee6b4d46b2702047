"""Resident memory of `breakglass serve` with 100,000 issued-and-expired tokens in its
database, against the same bot at rest on an empty database (issue: benchmark suite).

    python bench/memory.py [--write-docs] [--tokens 100000]

The rows are written straight into SQLite in the shape the real flow leaves them
(request, two approvals, token hash, four sent outbox rows, one use each); the
bot then starts on that file, runs its sweeper and answers a real request.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import load_policy, wait_healthy, write_section  # noqa: E402

from bot.core.kdf import new_master_key  # noqa: E402
from bot.local.emulator import SlackEmulator, SlackSender  # noqa: E402
from bot.local.sandbox import ProbeTarget  # noqa: E402
from bot.store.db import Database  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def fill(db_path: Path, n: int) -> None:
    con = sqlite3.connect(db_path)
    past = datetime.now(UTC) - timedelta(days=2)
    iso = past.strftime("%Y-%m-%d %H:%M:%S.%f")
    later = (past + timedelta(minutes=15)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with con:
        con.executemany(
            "INSERT INTO requests (id, scope, requester, reason, incident, requested_ttl_s, ttl_s, state,"
            " triggers, created_at, expires_at, closed_at, jti, kid, issued_at, token_expires_at,"
            " token_hash, revealed_at, grant, version) VALUES (?, 'payments-write', ?, ?, ?, 900, 900,"
            " 'expired', '[]', ?, ?, ?, ?, 'bg-bench', ?, ?, ?, ?, ?, 3)",
            ((f"B{i:07d}", f"U0REQ{i % 100:05d}", f"INC-{i} bench load", f"INC-{i}", iso, later,
              later, secrets.token_urlsafe(16), iso, later,
              hashlib.sha256(str(i).encode()).hexdigest(), iso,
              '{"audience":"payments-api","permissions":["payments:read","payments:write"]}')
             for i in range(n)))
        con.executemany("INSERT INTO decisions (request_id, user_id, decision, at) VALUES (?, ?, 'approve', ?)",
                        ((f"B{i:07d}", f"U0APP{k:05d}", iso) for i in range(n) for k in (0, 1)))
        con.executemany(
            "INSERT INTO outbox (lane, kind, payload, status, attempts, next_attempt_at, created_at, sent_at)"
            " VALUES ('C0INCIDENT', 'post', '{\"channel\":\"C0INCIDENT\",\"text\":\"x\"}', 'sent', 1, ?, ?, ?)",
            ((iso, iso, iso) for _ in range(n * 4)))
    con.close()


async def measure(n: int) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="bg-mem-"))
    probes = ProbeTarget()
    await probes.start()
    emu = SlackEmulator()
    await emu.start()
    secret, master = secrets.token_hex(16), new_master_key()
    client_secret = secrets.token_urlsafe(16)
    policy = load_policy(100, 4)(probes.url, client_secret)
    (tmp / "policy.toml").write_text(policy)
    results: dict[str, float] = {}
    try:
        for label, rows in (("at rest, empty database", 0), (f"{n:,} issued-and-expired tokens", n)):
            db_path = tmp / f"{rows}.db"
            db = Database(f"sqlite+aiosqlite:///{db_path}")
            await db.create_schema()
            await db.dispose()
            if rows:
                fill(db_path, rows)
            port = free_port()
            env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(8),
                   "SLACK_SIGNING_SECRET": secret, "SLACK_API_URL": emu.api_url,
                   "BREAKGLASS_POLICY": str(tmp / "policy.toml"),
                   "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{db_path}",
                   "BREAKGLASS_MASTER_KEY": master, "BREAKGLASS_HOST": "127.0.0.1",
                   "BREAKGLASS_PORT": str(port), "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0"}
            proc = subprocess.Popen([sys.executable, "-m", "bot", "serve", "--log-level", "WARNING"],
                                    env=env)
            try:
                base = f"http://127.0.0.1:{port}"
                await wait_healthy(base)
                async with aiohttp.ClientSession() as http:
                    sender = SlackSender(f"{base}/slack/events", secret, emu)
                    await sender.command("U0REQ00001", "payments-write 10m INC-1 memory bench")
                    await sender.command("U0REQ00002", "status")
                    async with http.get(f"{base}/.well-known/jwks.json") as r:
                        await r.read()
                    await sender.close()
                    await asyncio.sleep(3)  # several sweeper rounds over the full table
                    results[label] = rss_mb(proc.pid)
            finally:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 20)
    finally:
        await emu.stop()
        await probes.stop()
    rest = results["at rest, empty database"]
    full = results[f"{n:,} issued-and-expired tokens"]
    return [f"RSS at rest, empty database: {rest:.1f} MB",
            f"RSS with {n:,} issued-and-expired tokens: {full:.1f} MB ({full / rest:.2f}x at rest)",
            f"target <= 150 MB: {'met' if full <= 150 else 'MISSED'}"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--tokens", type=int, default=100_000)
    args = parser.parse_args()
    lines = asyncio.run(measure(args.tokens))
    print("\n".join(lines))
    if args.write_docs:
        write_section("memory", "\n".join(lines), "python bench/memory.py --write-docs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
