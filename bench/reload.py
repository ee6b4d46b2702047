"""A policy reload that revokes 10,000 live grants, and the acks around it.

    python bench/reload.py [--write-docs] [--grants 10000]

The bot runs as `python -m bot serve` in its own process (SQLite), the Slack emulator
and the probe target in this one, the load generator in a third. 10,000 live grants
of `payments-write` are seeded straight into the database; then the policy file is
rewritten so that scope's permissions are narrowed and the bot gets SIGHUP. Measured:

- the revocation pass: from SIGHUP until every seeded grant is `revoked` (polled in
  the database every 10 ms), target <= 2 s;
- the ack of 100 concurrent `/breakglass` commands fired as soon as the first grant
  is revoked (so during the pass), target p99 <= 50 ms; with a same-run baseline:
  the same 100 commands against the idle bot before the reload, and a bare aiohttp
  handler;
- after the pass, its follow-ups (`reconcile.follow_up`: DM and card edits, the
  announcements, the reviews) until none is pending, and the ack of another 100
  commands fired as the pass ends (so while they run); no target, reported so the
  whole cost of the reload is in view.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    BotProcess,
    LoadGenerator,
    command_fields,
    load_policy,
    pct,
    summary,
    write_section,
)
from slack_load import bare_server  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from bot.governance.reconcile import BATCH, FOLLOW_UP, JOB  # noqa: E402
from bot.store.db import Database  # noqa: E402
from bot.store.schema import requests  # noqa: E402

NARROWED = ('permissions = ["payments:read", "payments:write"]', 'permissions = ["payments:read"]')


async def seed(url: str, n: int) -> None:
    """n live (revealed) payments-write grants, written as the bot writes them."""
    db = Database(url)
    now = datetime.now(UTC)
    grant = json.dumps({"audience": "payments-api", "permissions": ["payments:read", "payments:write"]})
    try:
        for start in range(0, n, 1000):
            rows = [{
                "id": f"RB{i:06d}", "scope": "payments-write", "requester": f"U0REQ{i % 100:05d}",
                "reason": "bench", "incident": f"INC-{i}", "requested_ttl_s": 1800, "ttl_s": 1800,
                "state": "revealed", "triggers": "[]", "created_at": now, "expires_at": now +
                timedelta(minutes=30), "jti": secrets.token_hex(16), "kid": "bg-bench",
                "issued_at": now, "token_expires_at": now + timedelta(minutes=25),
                "token_hash": secrets.token_hex(32), "revealed_at": now, "grant": grant,
                "version": 2, "drill": False,
            } for i in range(start, min(n, start + 1000))]
            async with db.transaction() as conn:
                await conn.execute(insert(requests), rows)
    finally:
        await db.dispose()


async def count(bot: BotProcess, state: str) -> int:
    rows = await bot.query("SELECT count(*) FROM requests WHERE state = :state AND id LIKE 'RB%'",
                           state=state)
    return int(rows[0][0])


async def run(n: int) -> list[str]:
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bg-bench-") as tmp:
        bot = await BotProcess(load_policy(100, 4, quorum=2, trigger_timeout="1s"), tmp).start()
        runner, bare_url = await bare_server()
        try:
            async with LoadGenerator() as gen:
                url, secret, emu = f"{bot.url}/slack/events", bot.signing_secret, bot.emulator

                def commands(tag: str) -> list[dict[str, str]]:
                    return [command_fields(f"U0REQ{i:05d}", f"payments-write 10m INC-{tag}{i} bench",
                                           emu.new_response_url()) for i in range(100)]

                warm = [command_fields(f"U0REQ{i:05d}", "help", emu.new_response_url())
                        for i in range(20)]
                await gen.fire(url, secret, warm, 10)
                await gen.fire(bare_url, secret, warm, 10)
                base = await gen.fire(bare_url, secret, commands("B"), 100)
                idle = await gen.fire(url, secret, commands("I"), 100)

                started = time.perf_counter()
                await seed(bot.database.url, n)
                seeded_in = time.perf_counter() - started
                assert await count(bot, "revealed") == n
                await asyncio.sleep(3)  # the idle commands' background work settles

                policy_path = bot.tmp / "policy.toml"
                policy_path.write_text(policy_path.read_text().replace(*NARROWED))
                t0 = time.perf_counter()
                bot.procs[0].send_signal(signal.SIGHUP)
                first = None
                while await count(bot, "revoked") == 0:
                    if time.perf_counter() - t0 > 30:
                        raise TimeoutError("no grant revoked 30 s after SIGHUP")
                    await asyncio.sleep(0.005)
                first = time.perf_counter() - t0
                answered: list[float] = []

                async def wave() -> list[float]:
                    got = await gen.fire(url, secret, commands("R"), 100)
                    answered.append(time.perf_counter() - t0)
                    return got

                fired = asyncio.create_task(wave())
                revoked = 0
                while (revoked := await count(bot, "revoked")) < n:
                    if time.perf_counter() - t0 > 60:
                        raise TimeoutError(f"only {revoked} of {n} revoked after 60 s")
                    await asyncio.sleep(0.01)
                pass_s = time.perf_counter() - t0
                posts = [m.text for m in emu.messages("C0INCIDENT")]
                after_pass = asyncio.create_task(gen.fire(url, secret, commands("F"), 100))
                during = await fired
                wave_done = answered[0]
                while await bot.query("SELECT count(*) FROM outbox WHERE kind = :kind AND "
                                      "status = 'pending'", kind=JOB) != [(0,)]:
                    if time.perf_counter() - t0 > 120:
                        raise TimeoutError("follow-ups still pending 120 s after SIGHUP")
                    await asyncio.sleep(0.02)
                follow_s = time.perf_counter() - t0
                reviewed = await bot.query("SELECT count(*) FROM reviews WHERE request_id LIKE 'RB%'")
                following = await after_pass
                lines.extend([
                    f"seeded {n} live grants in {seeded_in:.1f}s",
                    f"revocation pass: SIGHUP -> first grant revoked {first * 1000:.0f} ms, "
                    f"-> all {n} revoked {pass_s * 1000:.0f} ms; "
                    f"target <= 2 s: {'met' if pass_s <= 2 else 'MISSED'}",
                    summary("bare aiohttp handler, 100 concurrent", base),
                    summary("/breakglass command ack, 100 concurrent, idle bot", idle),
                    summary("/breakglass command ack, 100 concurrent, during the pass", during),
                    f"the 100 commands were fired {first * 1000:.0f} ms after SIGHUP and all "
                    f"answered {wave_done * 1000:.0f} ms after it "
                    f"({'within' if wave_done <= pass_s else 'partly after'} the pass)",
                    f"ack p99 during / idle: {pct(during, 99) / pct(idle, 99):.2f}x, "
                    f"/ bare: {pct(during, 99) / pct(base, 99):.2f}x; target p99 <= 50 ms: "
                    f"{'met' if pct(during, 99) <= 50 else 'MISSED'}",
                    f"incident posts when the pass ended: {len(posts)} (the outbox holds its "
                    f"sends while the pass runs; batches of {BATCH} grants)",
                    f"follow-ups ({FOLLOW_UP} grants each: DM and card edits, reviews): all "
                    f"done {follow_s * 1000:.0f} ms after SIGHUP, "
                    f"{reviewed[0][0]} reviews opened",
                    summary("/breakglass command ack, 100 concurrent, fired as the pass ended "
                            "(during the follow-ups)", following),
                ])
        finally:
            await runner.cleanup()
            await bot.stop()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grants", type=int, default=10_000)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    lines = asyncio.run(run(args.grants))
    print("\n".join(lines))
    if args.write_docs:
        cmd = "python bench/reload.py --write-docs" + (
            f" --grants {args.grants}" if args.grants != 10_000 else "")
        write_section("reload", "\n".join(lines), cmd)


if __name__ == "__main__":
    main()
