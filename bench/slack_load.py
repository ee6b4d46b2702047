"""Ack latency, approval-to-DM latency, and 1,000 concurrent requests (the benchmark suite).

    python bench/slack_load.py [--write-docs] [--requests 1000] [--webhooks 2]

With `--webhooks N`, the policy has N `[[webhooks]]` entries (receivers on loopback in
this process, each checking every signature) and the 1,000-request run also waits for
every webhook event and reports how many arrived, late and doubled.

Three processes on loopback: the bot (`python -m bot serve`), this one (the Slack
Web API emulator and the probe target), and a load generator. The baseline is a
bare aiohttp handler driven by the same load generator in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    BotProcess,
    LoadGenerator,
    WebhookSink,
    click_fields,
    command_fields,
    fire_in_process,
    load_policy,
    pct,
    summary,
    write_section,
)

REVIEWS, INCIDENT = "C0REVIEWS", "C0INCIDENT"


async def bare_server() -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"response_type": "ephemeral", "text": "ok"})

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/slack/events", handler)
    app.router.add_get("/healthz", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/slack/events"


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


def n_requests(bot: BotProcess, state: str | None = None) -> int:
    if state is None:
        return int(bot.query("SELECT count(*) FROM requests")[0][0])
    return int(bot.query("SELECT count(*) FROM requests WHERE state = ?", state)[0][0])


SINK: WebhookSink | None = None  # --webhooks


def with_webhooks(policy: Callable[[str, str], str]) -> Callable[[str, str], str]:
    if SINK is None:
        return policy
    sink = SINK
    return lambda probe_url, client_secret: policy(probe_url, client_secret) + sink.policy()


async def with_bot(policy: Callable[[str, str], str], body: Callable[[BotProcess], Awaitable[None]]) -> None:
    with tempfile.TemporaryDirectory(prefix="bg-bench-") as tmp:
        bot = await BotProcess(with_webhooks(policy), tmp,
                               env=SINK.env() if SINK is not None else None).start()
        try:
            await body(bot)
        finally:
            await bot.stop()


async def ack_latency(lines: list[str]) -> None:
    """100 concurrent commands whose probes hang for their full 2 s timeout, then 100 clicks."""

    async def body(bot: BotProcess) -> None:
        runner, bare_url = await bare_server()
        try:
            bot.probes.status["auth"] = None  # hang: each probe waits its whole timeout
            url, emu = f"{bot.url}/slack/events", bot.emulator
            warm = [command_fields(f"U0REQ{i:05d}", "help", emu.new_response_url()) for i in range(20)]
            await fire_in_process(url, bot.signing_secret, warm, 10)
            await fire_in_process(bare_url, bot.signing_secret, warm, 10)
            forms = [command_fields(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench",
                                    emu.new_response_url()) for i in range(100)]
            base = await fire_in_process(bare_url, bot.signing_secret, forms, 100)
            cmd = await fire_in_process(url, bot.signing_secret, forms, 100)
            await wait_until(lambda: n_requests(bot) >= 100, 60, "100 requests opened")
            ids = [r[0] for r in bot.query("SELECT id FROM requests")]
            clicks = [click_fields("U0APP00000", "bg_approve", rid, REVIEWS, emu.new_response_url())
                      for rid in ids]
            click = await fire_in_process(url, bot.signing_secret, clicks, 100)
            worst = max(pct(cmd, 99), pct(click, 99))
            lines.extend([
                summary("bare aiohttp handler, 100 concurrent", base),
                summary("/breakglass command ack, 100 concurrent, probes hanging 2s", cmd),
                summary("Approve click ack, 100 concurrent", click),
                f"ack p99 / bare p99: command {pct(cmd, 99) / pct(base, 99):.2f}x, "
                f"click {pct(click, 99) / pct(base, 99):.2f}x; "
                f"target p99 <= 50 ms: {'met' if worst <= 50 else 'MISSED'}"])
        finally:
            await runner.cleanup()

    await with_bot(load_policy(100, 4, quorum=2, trigger_timeout="2s"), body)


async def approve_to_dm(lines: list[str], n: int = 50) -> None:
    """Time from sending the last Approve click to the emulator receiving the token DM."""

    async def body(bot: BotProcess) -> None:
        emu = bot.emulator
        for i in range(n):
            await bot.slack.command(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench")
        await wait_until(lambda: n_requests(bot) >= n, 60, "requests opened")
        rows = bot.query("SELECT id, requester FROM requests")
        for rid, _ in rows:
            await bot.slack.click("U0APP00000", "bg_approve", rid, channel_id=REVIEWS)
        await asyncio.sleep(2)
        lat: list[float] = []
        for rid, user in rows:
            dm = emu.dm_channel_for(user)
            before = len(emu.calls)
            sent = time.time()
            await bot.slack.click("U0APP00001", "bg_approve", rid, channel_id=REVIEWS)

            def dm_call(before: int = before, dm: str = dm) -> float | None:
                return next((c.at for c in emu.calls[before:]
                             if c.method == "chat.postMessage" and c.fault is None
                             and emu.resolve_channel(str(c.params.get("channel"))) == dm), None)

            await wait_until(lambda dm_call=dm_call: dm_call() is not None, 10, "token DM")
            lat.append((float(dm_call() or 0) - sent) * 1000)
        lines.extend([summary("last Approve click -> token DM at the emulator", lat),
                      f"target p99 <= 250 ms: {'met' if pct(lat, 99) <= 250 else 'MISSED'}"])

    await with_bot(load_policy(n, 4, quorum=2, trigger_timeout="1s"), body)


async def thousand(lines: list[str], n: int) -> None:
    """n concurrent requests, each approved by two reviewers and revealed."""

    async def body(bot: BotProcess) -> None:
        async with LoadGenerator() as gen:
            await run(bot, gen)

    async def run(bot: BotProcess, gen: LoadGenerator) -> None:
        emu = bot.emulator
        url, secret = f"{bot.url}/slack/events", bot.signing_secret
        marks: list[tuple[str, float]] = []
        await gen.fire(url, secret, [command_fields("U0REQ00000", "help", emu.new_response_url())], 1)
        started = time.perf_counter()
        forms = [command_fields(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench",
                                emu.new_response_url()) for i in range(n)]
        await gen.fire(url, secret, forms, 100)
        await wait_until(lambda: n_requests(bot) >= n, 120, f"{n} requests opened")
        marks.append(("requests opened", time.perf_counter() - started))
        rows = bot.query("SELECT id, requester FROM requests")
        clicks = []
        for k, (rid, _user) in enumerate(rows):
            for a in (k % 10, (k + 1) % 10):
                clicks.append(click_fields(f"U0APP{a:05d}", "bg_approve", rid, REVIEWS,
                                           emu.new_response_url()))
        await gen.fire(url, secret, clicks, 100)
        await wait_until(lambda: n_requests(bot, "issued") >= n, 120, "all issued")
        marks.append(("all approved and issued", time.perf_counter() - started))

        def dms() -> int:
            return sum(1 for c in emu.calls if c.method == "chat.postMessage" and c.fault is None
                       and str(c.params.get("channel", "")).startswith("U0REQ"))

        await wait_until(lambda: dms() >= n, 120, "all token DMs")
        marks.append(("all token DMs delivered", time.perf_counter() - started))
        reveals = [click_fields(user, "bg_reveal", rid, emu.dm_channel_for(user),
                                emu.new_response_url()) for rid, user in rows]
        await gen.fire(url, secret, reveals, 100)
        await wait_until(lambda: len(emu.calls_to("views.open")) >= n, 120, "all reveals")
        elapsed = time.perf_counter() - started
        marks.append(("all revealed", elapsed))
        revealed = n_requests(bot, "revealed")
        jtis = bot.query("SELECT count(DISTINCT jti) FROM requests")[0][0]
        hashes = bot.query("SELECT count(DISTINCT token_hash) FROM requests")[0][0]
        issued_rows = bot.query("SELECT count(*) FROM audit_log WHERE event = 'issued'")[0][0]
        views = len(emu.calls_to("views.open"))
        backlog = bot.query("SELECT count(*) FROM outbox WHERE status = 'pending' AND kind != 'webhook'")[0][0]
        dup = max(0, views - n) + (revealed - hashes) + max(0, issued_rows - n)
        lines.extend([
            f"{n} concurrent requests, 2 approvals each, revealed: {elapsed:.1f}s total ("
            + ", ".join(f"{what} at {t:.1f}s" for what, t in marks) + ")",
            f"tokens {revealed}, distinct jti {jtis}, distinct hashes {hashes}, issued audit rows "
            f"{issued_rows}, reveal modals {views}, duplicates {dup}; channel posts still queued: {backlog}",
            f"target exactly {n} tokens, 0 duplicates, <= 30 s: "
            f"{'met' if revealed == n and dup == 0 and elapsed <= 30 else 'MISSED'}"])
        if SINK is not None:
            await webhook_figures(bot, SINK, started, elapsed, lines)

    await with_bot(load_policy(n, 10, quorum=2, trigger_timeout="2s"), body)


async def webhook_figures(bot: BotProcess, sink: WebhookSink, started: float, elapsed: float,
                          lines: list[str]) -> None:
    events = ", ".join(f"'{e}'" for e in sink.EVENTS)
    want = int(bot.query(f"SELECT count(*) FROM audit_log WHERE event IN ({events})")[0][0])
    try:
        await wait_until(lambda: min(sink.delivered()) >= want, 180, "every webhook event")
    except TimeoutError:
        pass
    late = max(sink.last_at) - started if max(sink.last_at) else float("nan")
    dead = bot.query("SELECT count(*) FROM outbox WHERE kind = 'webhook' AND status = 'dead'")[0][0]
    lines.extend([
        f"{sink.n} webhooks: {want} listed events audited; delivered "
        + ", ".join(str(d) for d in sink.delivered())
        + f" (distinct ids); repeats {sum(sink.duplicates)}, bad signatures "
        f"{sink.bad_signatures}, dead letters {dead}; the last arrived {late:.1f}s after the "
        f"start ({late - elapsed:+.1f}s after the last reveal)",
        f"target every webhook event delivered once: "
        f"{'met' if min(sink.delivered()) == want and not sink.bad_signatures else 'MISSED'}"])


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--only", choices=["ack", "dm", "thousand"])
    parser.add_argument("--webhooks", type=int, default=0,
                        help="configure this many webhooks (receivers on loopback)")
    args = parser.parse_args()
    global SINK
    if args.webhooks:
        SINK = await WebhookSink(args.webhooks).start()
    lines: list[str] = []
    scenarios = {"ack": ack_latency, "dm": approve_to_dm,
                 "thousand": lambda ls: thousand(ls, args.requests)}
    for name, scenario in scenarios.items():
        if args.only and name != args.only:
            continue
        before = len(lines)
        await scenario(lines)
        print("\n".join(lines[before:]), flush=True)
    if SINK is not None:
        await SINK.stop()
    if args.write_docs:
        name = "slack_load_webhooks" if args.webhooks else "slack_load"
        command = "python bench/slack_load.py --write-docs" + (
            f" --webhooks {args.webhooks}" if args.webhooks else "")
        write_section(name, "\n".join(lines), command)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
