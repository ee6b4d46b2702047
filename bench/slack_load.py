"""Ack latency, approval-to-DM latency, and 1,000 concurrent requests (issue: benchmark suite).

    python bench/slack_load.py [--write-docs] [--requests 1000]

Everything runs on loopback: the Slack emulator, a probe target, the bot, and a
bare aiohttp handler as the baseline; the load generator runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    click_fields,
    command_fields,
    fire_in_process,
    load_policy,
    pct,
    summary,
    write_section,
)
from sqlalchemy import func, select  # noqa: E402

from bot.sandbox import Sandbox  # noqa: E402
from bot.store.schema import requests  # noqa: E402

REVIEWS, INCIDENT = "C0REVIEWS", "C0INCIDENT"


async def bare_server() -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"response_type": "ephemeral", "text": "ok"})

    app = web.Application()
    app.router.add_post("/slack/events", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/slack/events"


async def count(box: Sandbox, *where: object) -> int:
    async with box.bot.db.read() as conn:
        return int(await conn.scalar(select(func.count()).select_from(requests).where(*where)) or 0)


async def wait_until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


async def ack_latency(lines: list[str]) -> None:
    """100 concurrent commands whose probes hang for their full 2 s timeout, then 100 clicks."""
    box = Sandbox(policy_override=load_policy(100, 4, quorum=2, trigger_timeout="2s"))
    await box.start()
    runner, bare_url = await bare_server()
    try:
        box.probes.status["auth"] = None  # hang: each probe waits its whole timeout
        url = f"{box.url}/slack/events"
        emu = box.emulator
        warm = [command_fields(f"U0REQ{i:05d}", "help", emu.new_response_url()) for i in range(20)]
        await fire_in_process(url, box.signing_secret, warm, 10)
        await fire_in_process(bare_url, box.signing_secret, warm, 10)
        forms = [command_fields(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench",
                                emu.new_response_url()) for i in range(100)]
        base = await fire_in_process(bare_url, box.signing_secret, forms, 100)
        cmd = await fire_in_process(url, box.signing_secret, forms, 100)
        await wait_until(lambda: _n(box, 100), 30, "100 requests opened")
        ids = await _ids(box)
        clicks = [click_fields("U0APP00000", "bg_approve", rid, REVIEWS, emu.new_response_url())
                  for rid in ids]
        click = await fire_in_process(url, box.signing_secret, clicks, 100)
        await box.settle(30)
        lines += [summary("bare aiohttp handler, 100 concurrent", base),
                  summary("/breakglass command ack, 100 concurrent, probes hanging 2s", cmd),
                  summary("Approve click ack, 100 concurrent", click),
                  f"command ack p99 / bare p99 = {pct(cmd, 99) / pct(base, 99):.2f}x; "
                  f"target p99 <= 50 ms: {'met' if max(pct(cmd, 99), pct(click, 99)) <= 50 else 'MISSED'}"]
    finally:
        await runner.cleanup()
        await box.stop()


async def _n(box: Sandbox, n: int) -> bool:
    return await count(box) >= n


async def _ids(box: Sandbox) -> list[str]:
    async with box.bot.db.read() as conn:
        return [r[0] for r in (await conn.execute(select(requests.c.id))).all()]


async def approve_to_dm(lines: list[str], n: int = 50) -> None:
    """Time from sending the last Approve click to the emulator receiving the token DM."""
    box = Sandbox(policy_override=load_policy(n, 4, quorum=2, trigger_timeout="1s"))
    await box.start()
    try:
        emu = box.emulator
        for i in range(n):
            await box.slack.command(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench")
        await wait_until(lambda: _n(box, n), 30, "requests opened")
        await box.settle(30)
        ids = await _ids(box)
        for rid in ids:
            await box.slack.click("U0APP00000", "bg_approve", rid, channel_id=REVIEWS)
        await box.settle(30)
        lat: list[float] = []
        for rid in ids:
            before = len(emu.calls)
            user = None
            async with box.bot.db.read() as conn:
                user = (await conn.execute(select(requests.c.requester)
                                           .where(requests.c.id == rid))).scalar_one()
            sent = time.time()
            await box.slack.click("U0APP00001", "bg_approve", rid, channel_id=REVIEWS)
            dm = emu.dm_channel_for(user)

            def arrived(before: int = before, dm: str = dm) -> bool:
                return any(c.method == "chat.postMessage" and c.fault is None
                           and emu.resolve_channel(str(c.params.get("channel"))) == dm
                           for c in emu.calls[before:])

            await emu.wait_for(arrived, timeout=10)
            at = next(c.at for c in emu.calls[before:] if c.method == "chat.postMessage"
                      and emu.resolve_channel(str(c.params.get("channel"))) == dm)
            lat.append((at - sent) * 1000)
        lines += [summary("last Approve click -> token DM at the emulator", lat),
                  f"target p99 <= 250 ms: {'met' if pct(lat, 99) <= 250 else 'MISSED'}"]
    finally:
        await box.stop()


async def thousand(lines: list[str], n: int) -> None:
    """n concurrent requests, each approved by two reviewers and revealed."""
    box = Sandbox(policy_override=load_policy(n, 10, quorum=2, trigger_timeout="2s"))
    await box.start()
    try:
        emu = box.emulator
        url, secret = f"{box.url}/slack/events", box.signing_secret
        started = time.perf_counter()
        forms = [command_fields(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench",
                                emu.new_response_url()) for i in range(n)]
        await fire_in_process(url, secret, forms, 100)
        await wait_until(lambda: _n(box, n), 60, f"{n} requests opened")
        async with box.bot.db.read() as conn:
            rows = (await conn.execute(select(requests.c.id, requests.c.requester))).all()
        clicks = []
        for k, (rid, _user) in enumerate(rows):
            a, b = k % 10, (k + 1) % 10
            clicks.append(click_fields(f"U0APP{a:05d}", "bg_approve", rid, REVIEWS, emu.new_response_url()))
            clicks.append(click_fields(f"U0APP{b:05d}", "bg_approve", rid, REVIEWS, emu.new_response_url()))
        await fire_in_process(url, secret, clicks, 100)

        async def all_dms() -> bool:
            return sum(1 for c in emu.calls if c.method == "chat.postMessage" and c.fault is None
                       and str(c.params.get("channel", "")).startswith("U0REQ")) >= n
        await wait_until(all_dms, 60, "all DMs")
        reveals = [click_fields(user, "bg_reveal", rid, emu.dm_channel_for(user), emu.new_response_url())
                   for rid, user in rows]
        await fire_in_process(url, secret, reveals, 100)

        async def all_views() -> bool:
            return len(emu.calls_to("views.open")) >= n
        await wait_until(all_views, 60, "all reveals")
        elapsed = time.perf_counter() - started
        await box.settle(60)
        async with box.bot.db.read() as conn:
            revealed = await conn.scalar(select(func.count()).select_from(requests)
                                         .where(requests.c.state == "revealed"))
            jtis = await conn.scalar(select(func.count(func.distinct(requests.c.jti))))
            hashes = await conn.scalar(select(func.count(func.distinct(requests.c.token_hash))))
        issued_posts = sum(1 for m in emu.messages(INCIDENT) if "*issued*" in (m.text or ""))
        views = len(emu.calls_to("views.open"))
        dup = (issued_posts - n) + (views - n) + (int(revealed or 0) - int(hashes or 0))
        lines += [f"{n} concurrent requests, 2 approvals each, revealed: {elapsed:.1f}s total; "
                  f"tokens {revealed}, distinct jti {jtis}, distinct hashes {hashes}, "
                  f"issued posts {issued_posts}, reveal modals {views}, duplicates {dup}",
                  f"target exactly {n} tokens, 0 duplicates, <= 30 s: "
                  f"{'met' if revealed == n and dup == 0 and elapsed <= 30 else 'MISSED'}"]
    finally:
        await box.stop()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    lines: list[str] = []
    await ack_latency(lines)
    await approve_to_dm(lines)
    await thousand(lines, args.requests)
    print("\n".join(lines))
    if args.write_docs:
        write_section("slack_load", "\n".join(lines), "python bench/slack_load.py --write-docs")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
