"""Ack latency, approval-to-DM latency, and 1,000 concurrent requests (the benchmark suite).

    python bench/slack_load.py [--write-docs] [--requests 1000] [--only thousand]
                               [--webhooks 2] [--postgres URL] [--replicas 2] [--compare]

With `--webhooks N`, the policy has N `[[webhooks]]` entries (receivers on loopback in
this process, each checking every signature) and the 1,000-request run also waits for
every webhook event and reports how many arrived, late and doubled.

With `--postgres URL` (an admin URL; the bench creates a fresh database `bench_<random>`
and drops it at the end) the bot runs on PostgreSQL; with `--replicas N`, N `serve`
processes share the one database and the load generator spreads commands and clicks
over them round-robin. The duplicate checks read the database through SQLAlchemy and
count what reached the emulator (modals, token DMs), whichever replica sent it. With
`--compare` the same scenarios run first on SQLite with one replica (and, for N > 1, on
the chosen backend with one replica) and the same-run ratios close the output.

Three processes on loopback: the bot (`python -m bot serve`), this one (the Slack
Web API emulator and the probe target), and a load generator. The baseline is a
bare aiohttp handler driven by the same load generator in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
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
    CpuMeter,
    LoadGenerator,
    WebhookSink,
    click_fields,
    command_fields,
    configurations,
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


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if await got if inspect.isawaitable(got) else got:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


async def count(bot: BotProcess, sql: str, **params: object) -> int:
    return int((await bot.query(sql, **params))[0][0])


async def ge(value: Awaitable[int], n: int) -> bool:
    return await value >= n


async def n_requests(bot: BotProcess, state: str | None = None) -> int:
    if state is None:
        return await count(bot, "SELECT count(*) FROM requests")
    return await count(bot, "SELECT count(*) FROM requests WHERE state = :state", state=state)


SINK: WebhookSink | None = None  # --webhooks
POSTGRES: str | None = None  # --postgres: an admin URL; each run gets a fresh database
REPLICAS = 1  # --replicas
FIGURES: dict[str, float] = {}  # the last run's headline figures, for same-run ratios


def with_webhooks(policy: Callable[[str, str], str]) -> Callable[[str, str], str]:
    if SINK is None:
        return policy
    sink = SINK
    return lambda probe_url, client_secret: policy(probe_url, client_secret) + sink.policy()


async def with_bot(policy: Callable[[str, str], str], body: Callable[[BotProcess], Awaitable[None]]) -> None:
    with tempfile.TemporaryDirectory(prefix="bg-bench-") as tmp:
        bot = await BotProcess(with_webhooks(policy), tmp,
                               env=SINK.env() if SINK is not None else None,
                               postgres=POSTGRES, replicas=REPLICAS).start()
        try:
            await body(bot)
        finally:
            await bot.stop()


async def ack_latency(lines: list[str], n: int = 100) -> None:
    """n (100) concurrent commands whose probes hang for their full 2 s timeout, then n clicks."""

    async def body(bot: BotProcess) -> None:
        runner, bare_url = await bare_server()
        try:
            bot.probes.status["auth"] = None  # hang: each probe waits its whole timeout
            url, emu = bot.events_urls, bot.emulator
            warm = [command_fields(f"U0REQ{i:05d}", "help", emu.new_response_url()) for i in range(20)]
            await fire_in_process(url, bot.signing_secret, warm, 10)
            await fire_in_process(bare_url, bot.signing_secret, warm, 10)
            forms = [command_fields(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench",
                                    emu.new_response_url()) for i in range(n)]
            base = await fire_in_process(bare_url, bot.signing_secret, forms, n)
            cmd = await fire_in_process(url, bot.signing_secret, forms, n)
            await wait_until(lambda: ge(n_requests(bot), n), 60, f"{n} requests opened")
            ids = [r[0] for r in await bot.query("SELECT id FROM requests")]
            clicks = [click_fields("U0APP00000", "bg_approve", rid, REVIEWS, emu.new_response_url())
                      for rid in ids]
            click = await fire_in_process(url, bot.signing_secret, clicks, n)
            worst = max(pct(cmd, 99), pct(click, 99))
            FIGURES.update({"command ack p99": pct(cmd, 99), "click ack p99": pct(click, 99)})
            lines.extend([
                summary(f"bare aiohttp handler, {n} concurrent", base),
                summary(f"/breakglass command ack, {n} concurrent, probes hanging 2s", cmd),
                summary(f"Approve click ack, {n} concurrent", click),
                f"ack p99 / bare p99: command {pct(cmd, 99) / pct(base, 99):.2f}x, "
                f"click {pct(click, 99) / pct(base, 99):.2f}x; "
                f"target p99 <= 50 ms: {'met' if worst <= 50 else 'MISSED'}"])
        finally:
            await runner.cleanup()

    await with_bot(load_policy(n, 4, quorum=2, trigger_timeout="2s"), body)


async def approve_to_dm(lines: list[str], n: int = 50) -> None:
    """Time from sending the last Approve click to the emulator receiving the token DM."""

    async def body(bot: BotProcess) -> None:
        emu = bot.emulator
        slack = bot.senders  # round-robin over the replicas
        for i in range(n):
            await slack[i % len(slack)].command(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench")
        await wait_until(lambda: ge(n_requests(bot), n), 60, "requests opened")
        rows = await bot.query("SELECT id, requester FROM requests")
        for k, (rid, _) in enumerate(rows):
            await slack[k % len(slack)].click("U0APP00000", "bg_approve", rid, channel_id=REVIEWS)
        await asyncio.sleep(2)
        lat: list[float] = []
        for k, (rid, user) in enumerate(rows):
            dm = emu.dm_channel_for(user)
            before = len(emu.calls)
            sent = time.time()
            await slack[(k + 1) % len(slack)].click("U0APP00001", "bg_approve", rid,
                                                    channel_id=REVIEWS)

            def dm_call(before: int = before, dm: str = dm) -> float | None:
                return next((c.at for c in emu.calls[before:]
                             if c.method == "chat.postMessage" and c.fault is None
                             and emu.resolve_channel(str(c.params.get("channel"))) == dm), None)

            await wait_until(lambda dm_call=dm_call: dm_call() is not None, 10, "token DM")
            lat.append((float(dm_call() or 0) - sent) * 1000)
        FIGURES["Approve -> DM p99"] = pct(lat, 99)
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
        url, secret = bot.events_urls, bot.signing_secret
        marks: list[tuple[str, float]] = []
        await gen.fire(url, secret, [command_fields("U0REQ00000", "help", emu.new_response_url())], 1)
        cpu = CpuMeter(bot, gen.pid)
        await cpu.start()
        started = time.perf_counter()
        forms = [command_fields(f"U0REQ{i:05d}", f"payments-write 10m INC-{i} bench",
                                emu.new_response_url()) for i in range(n)]
        await gen.fire(url, secret, forms, 100)
        await wait_until(lambda: ge(n_requests(bot), n), 120, f"{n} requests opened")
        marks.append(("requests opened", time.perf_counter() - started))
        rows = await bot.query("SELECT id, requester FROM requests")
        clicks = []
        for k, (rid, _user) in enumerate(rows):
            for a in (k % 10, (k + 1) % 10):
                clicks.append(click_fields(f"U0APP{a:05d}", "bg_approve", rid, REVIEWS,
                                           emu.new_response_url()))
        await gen.fire(url, secret, clicks, 100)
        await wait_until(lambda: ge(n_requests(bot, "issued"), n), 120, "all issued")
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
        cpu_line = await cpu.stop()
        revealed = await n_requests(bot, "revealed")
        jtis = await count(bot, "SELECT count(DISTINCT jti) FROM requests")
        hashes = await count(bot, "SELECT count(DISTINCT token_hash) FROM requests")
        issued_rows = await count(bot, "SELECT count(*) FROM audit_log WHERE event = 'issued'")
        views = len(emu.calls_to("views.open"))
        backlog = await count(bot, "SELECT count(*) FROM outbox WHERE status = 'pending' "
                                   "AND kind != 'webhook'")
        token_dms = dms()
        FIGURES[f"{n}-request total"] = elapsed
        dup = (max(0, views - n) + (revealed - hashes) + max(0, issued_rows - n)
               + max(0, token_dms - n))
        lines.extend([
            f"{n} concurrent requests, 2 approvals each, revealed: {elapsed:.1f}s total ("
            + ", ".join(f"{what} at {t:.1f}s" for what, t in marks) + ")",
            f"tokens {revealed}, distinct jti {jtis}, distinct hashes {hashes}, issued audit rows "
            f"{issued_rows}, reveal modals {views}, token DMs {token_dms}, duplicates {dup}; "
            f"channel posts still queued: {backlog}",
            f"target exactly {n} tokens, 0 duplicates, <= 30 s: "
            f"{'met' if revealed == n and dup == 0 and elapsed <= 30 else 'MISSED'}",
            cpu_line])
        if SINK is not None:
            await webhook_figures(bot, SINK, started, elapsed, lines)

    await with_bot(load_policy(n, 10, quorum=2, trigger_timeout="2s"), body)


async def webhook_figures(bot: BotProcess, sink: WebhookSink, started: float, elapsed: float,
                          lines: list[str]) -> None:
    # Checkpoints go to every webhook whatever its `events` list (contract §7.6).
    events = ", ".join(f"'{e}'" for e in [*sink.EVENTS, "checkpoint"])
    # Events keep being audited after the run (checkpoints, summaries): count again once
    # the receivers have what was counted, until the count stops moving.
    want = -1
    for _ in range(10):
        counted = await count(bot, f"SELECT count(*) FROM audit_log WHERE event IN ({events})")
        if counted == want:
            break
        want = counted
        try:
            await wait_until(lambda w=want: min(sink.delivered()) >= w, 180, "every webhook event")
        except TimeoutError:
            break
        await asyncio.sleep(2.0)
    late = max(sink.last_at) - started if max(sink.last_at) else float("nan")
    dead = await count(bot, "SELECT count(*) FROM outbox WHERE kind = 'webhook' AND status = 'dead'")
    lines.extend([
        f"{sink.n} webhooks: {want} listed events audited; delivered "
        + ", ".join(str(d) for d in sink.delivered())
        + f" (distinct ids); repeats {sum(sink.duplicates)}, bad signatures "
        f"{sink.bad_signatures}, dead letters {dead}; the last arrived {late:.1f}s after the "
        f"start ({late - elapsed:+.1f}s after the last reveal)",
        f"target every webhook event delivered once: "
        f"{'met' if min(sink.delivered()) == want and not sink.bad_signatures else 'MISSED'}"])


def label(postgres: str | None, replicas: int) -> str:
    return (f"{'PostgreSQL' if postgres else 'SQLite'}, {replicas} "
            f"replica{'s' if replicas > 1 else ''}")


def ratio_lines(figures: dict[str, dict[str, float]]) -> list[str]:
    """Each run's figures ÷ each baseline's, for the figures both have."""
    names = list(figures)
    out = []
    for base in names[:-1]:
        for other in names[names.index(base) + 1:]:
            parts = [f"{what} {figures[other][what] / figures[base][what]:.2f}x"
                     for what in figures[other] if figures[base].get(what)]
            if parts:
                out.append(f"same run, {other} / {base}: " + ", ".join(parts))
    return out


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--only", choices=["ack", "dm", "thousand"])
    parser.add_argument("--webhooks", type=int, default=0,
                        help="configure this many webhooks (receivers on loopback)")
    parser.add_argument("--postgres", metavar="URL",
                        help="run the bot on PostgreSQL: an admin URL such as postgresql+asyncpg://"
                             "postgres@127.0.0.1:5432/postgres; each run creates a fresh database "
                             "bench_<random> there and drops it at the end")
    parser.add_argument("--replicas", type=int, default=1,
                        help="run N `python -m bot serve` processes on the one database; commands "
                             "and clicks go to them round-robin")
    parser.add_argument("--compare", action="store_true",
                        help="first run the same scenarios on SQLite with one replica (and, with "
                             "--replicas N, on the same backend with one replica) and print the "
                             "same-run ratios")
    args = parser.parse_args()
    if args.replicas < 1:
        parser.error("--replicas takes a whole number of at least 1")
    if args.postgres and not args.postgres.startswith("postgresql"):
        parser.error("--postgres takes a URL such as postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    global SINK, POSTGRES, REPLICAS
    if args.webhooks:
        SINK = await WebhookSink(args.webhooks).start()
    lines: list[str] = []
    # --requests below 100 (or 50) shrinks the ack (and DM) runs too: a quick check.
    scenarios = {"ack": lambda ls: ack_latency(ls, min(100, args.requests)),
                 "dm": lambda ls: approve_to_dm(ls, min(50, args.requests)),
                 "thousand": lambda ls: thousand(ls, args.requests)}
    runs = configurations(args)
    figures: dict[str, dict[str, float]] = {}
    for POSTGRES, REPLICAS in runs:
        if runs != [(None, 1)]:  # the SQLite-only run keeps its output as it was
            lines.append(f"-- {label(POSTGRES, REPLICAS)}")
            print(lines[-1], flush=True)
        FIGURES.clear()
        for name, scenario in scenarios.items():
            if args.only and name != args.only:
                continue
            if SINK is not None:
                SINK.reset()
            before = len(lines)
            await scenario(lines)
            print("\n".join(lines[before:]), flush=True)
        figures[label(POSTGRES, REPLICAS)] = dict(FIGURES)
    if len(runs) > 1:
        lines.extend(ratio_lines(figures))
        print("\n".join(ratio_lines(figures)), flush=True)
    if SINK is not None:
        await SINK.stop()
    if args.write_docs:
        name = "slack_load"
        if args.postgres or args.replicas > 1:
            name += "_postgres" if args.postgres else "_replicas"
        if args.webhooks:
            name += "_webhooks"
        command = "python bench/slack_load.py --write-docs" + "".join(
            f" {flag}" for flag, on in [
                (f"--only {args.only}", args.only), (f"--requests {args.requests}", args.requests != 1000),
                (f"--webhooks {args.webhooks}", args.webhooks), ("--postgres URL", args.postgres),
                (f"--replicas {args.replicas}", args.replicas > 1), ("--compare", args.compare)] if on)
        write_section(name, "\n".join(lines), command)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
