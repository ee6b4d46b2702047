"""Introspection throughput against a bare aiohttp hello-world, on this machine.

    python bench/introspect.py [--duration 10] [--rounds 3] [--connections 64]
                               [--algorithm RS256] [--write-docs]

Starts the bot (a `Sandbox`: the real Runtime over loopback HTTP, SQLite in a temp
dir, sweeping every second as `breakglass serve` does) and a bare aiohttp hello-world server the same way (AppRunner, TCPSite on
127.0.0.1, no access log), gets a token through the real flow (command, two
approvals, reveal), then drives each server in turn with the same load: one
load-generator process (multiprocessing, so it does not share the servers'
event loop or GIL) keeping `--connections` keep-alive HTTP/1.1 connections
busy for `--duration` seconds, each sending the same request:

    POST /oauth2/introspect  Authorization: Basic …  token=<the token>

(the hello-world server answers it without reading the body). Prints requests/s,
p50 and p99 latency for each, and `introspect/hello ratio R`. The introspection
run must answer `"active": true` every time, or the run is reported as failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import multiprocessing as mp
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")


# ----------------------------------------------------------------------------- load


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    unexpected: int  # 200 answers without the expected text
    client_cpu: float = 0.0  # CPU seconds the load generator used while measuring
    server_cpu: float = 0.0  # CPU seconds the server process used while measuring
    rest_cpu: float | None = None  # the rest of the machine, serve processes only
    db_cpu: float | None = None  # PostgreSQL's processes serving the bots' connections

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class _Conn(asyncio.Protocol):
    """One keep-alive connection: send, read one whole response, send again."""

    def __init__(self, load: _Load, request: bytes) -> None:
        self.load = load
        self.request = request
        self.buf = b""
        self.started = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.started = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self.load.failed("response without Content-Length")
                return
            length = int(head[at + 17:head.find(b"\r\n", at + 2) if head.find(b"\r\n", at + 2) > 0
                              else len(head)].strip())
            total = end + 4 + length
            if len(self.buf) < total:
                return
            response, self.buf = self.buf[:total], self.buf[total:]
            self.load.answered(response, time.perf_counter() - self.started)
            if self.load.running:
                self.send()
            else:
                self.load.closed(self)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.closed(self)


class _Load:
    def __init__(self, expect: bytes, measuring_from: float) -> None:
        self.expect = expect
        self.running = True
        self.measuring_from = measuring_from
        self.latencies: list[float] = []
        self.errors = 0
        self.unexpected = 0
        self.open: set[_Conn] = set()
        self.all_closed = asyncio.get_running_loop().create_future()

    def answered(self, response: bytes, seconds: float) -> None:
        if time.perf_counter() < self.measuring_from:
            return  # warm-up
        if not response.startswith(b"HTTP/1.1 200"):
            self.errors += 1
        elif self.expect not in response:
            self.unexpected += 1
        self.latencies.append(seconds)

    def failed(self, why: str) -> None:
        self.errors += 1
        self.running = False

    def closed(self, conn: _Conn) -> None:
        if conn.transport is not None:
            conn.transport.close()
        self.open.discard(conn)
        if not self.open and not self.all_closed.done():
            self.all_closed.set_result(None)


async def _drive(targets: list[tuple[str, bytes]], expect: bytes, connections: int,
                 warmup: float, duration: float, mark: Any = None) -> Result:
    """Connection i goes to target i mod N (replicas share the connections evenly)."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    load = _Load(expect, start + warmup)
    for i in range(connections):
        url, request = targets[i % len(targets)]
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        _, conn = await loop.create_connection(lambda r=request: _Conn(load, r), host, port)  # type: ignore[misc]
        load.open.add(conn)
    await asyncio.sleep(warmup - (time.perf_counter() - start))
    if mark is not None:
        mark("start")  # the parent reads the servers' CPU clocks at both marks
    cpu = time.process_time()
    await asyncio.sleep(warmup + duration - (time.perf_counter() - start))
    load.running = False
    cpu = time.process_time() - cpu
    if mark is not None:
        mark("end")
    measured = time.perf_counter() - load.measuring_from
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(load.all_closed, 10)
    lat = sorted(load.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return Result(len(lat), measured, pct(0.50), pct(0.99), load.errors, load.unexpected, cpu)


def _child(targets: list[tuple[str, bytes]], expect: bytes, connections: int, warmup: float,
           duration: float, out: Any) -> None:
    out.put(asyncio.run(_drive(targets, expect, connections, warmup, duration, out.put)))


def http_request(url: str, token: str, client_id: str, secret: str) -> bytes:
    parts = urlsplit(url)
    body = urlencode({"token": token}).encode("ascii")
    auth = base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")
    return (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Basic {auth}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("ascii") + body


async def run_load(url: str | list[str], request: bytes | list[bytes], expect: bytes, *,
                   connections: int, warmup: float, duration: float,
                   server_pids: list[int] | None = None,
                   db_pids: Callable[[], Awaitable[list[int]]] | None = None) -> Result:
    """Drive `url` (or each of several, with its own request) from a separate process;
    this process's event loop keeps serving. With `server_pids` (serve processes), the
    server's CPU is theirs, and the rest of the machine's busy time is reported too; with
    `db_pids`, PostgreSQL's backends for the bots' database apart from that rest."""
    from bench._common import machine_cpu_seconds, proc_cpu_seconds

    urls = [url] if isinstance(url, str) else url
    requests = [request] if isinstance(request, bytes) else request
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(list(zip(urls, requests, strict=True)), expect,
                                            connections, warmup, duration, out), daemon=True)
    proc.start()

    def servers() -> float:
        return sum(proc_cpu_seconds(pid) for pid in server_pids or [])

    try:
        # the child starts (spawn), warms up, then marks the start and the end of measuring
        await asyncio.to_thread(out.get, True, warmup + 120)
        backends = await db_pids() if db_pids is not None else []
        cpu, their, machine = time.process_time(), servers(), machine_cpu_seconds()
        db = sum(proc_cpu_seconds(pid) for pid in backends)
        await asyncio.to_thread(out.get, True, duration + 60)
        own = time.process_time() - cpu
        theirs, machine = servers() - their, machine_cpu_seconds() - machine
        db = sum(proc_cpu_seconds(pid) for pid in backends) - db
        result: Result = await asyncio.to_thread(out.get, True, 60)
        if server_pids:
            result.server_cpu = theirs
            result.db_cpu = db if backends else None
            result.rest_cpu = max(0.0, machine - theirs - result.client_cpu - own - db)
        else:
            result.server_cpu = own
    finally:
        await asyncio.to_thread(proc.join, 10)
    return result


# ----------------------------------------------------------------------------- servers


async def hello_server() -> tuple[web.AppRunner, str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="Hello, world")

    app = web.Application()
    app.router.add_route("*", "/oauth2/introspect", hello)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
    return runner, f"http://127.0.0.1:{port}/oauth2/introspect"


async def token_from_flow(box: Any) -> str:
    from bot.local.sandbox import ALICE, BOB, CAROL, REVIEWS

    await box.slack.command(ALICE, "payments-write 30m INC-4521 bench")
    await box.settle()
    rid = box.latest_request_id()
    for approver in (BOB, CAROL):
        await box.slack.click(approver, "bg_approve", rid, channel_id=REVIEWS)
        await box.settle()
    await box.slack.click(ALICE, "bg_reveal", rid, channel_id=box.emulator.dm_channel_for(ALICE))
    await box.settle()
    view = box.emulator.views[-1].view
    for block in view.get("blocks", []):
        found = _JWT.search(block.get("text", {}).get("text", ""))
        if found:
            return found.group(0)
    raise RuntimeError("the reveal modal held no token")


def _line(name: str, r: Result, width: int = 14) -> str:
    rest = "" if r.db_cpu is None else f", PostgreSQL {r.db_cpu / r.seconds:.0%}"
    rest += "" if r.rest_cpu is None else f", rest of the machine {r.rest_cpu / r.seconds:.0%}"
    return (f"{name:<{width}} {r.rate:>9.0f} req/s   p50 {r.p50_ms:6.2f} ms   p99 {r.p99_ms:6.2f} ms"
            f"   CPU: server {r.server_cpu / r.seconds:.0%}, load generator "
            f"{r.client_cpu / r.seconds:.0%}{rest}   ({r.requests} requests in {r.seconds:.1f}s, {r.errors} errors"
            + (f", {r.unexpected} unexpected answers" if r.unexpected else "") + ")")


async def main(args: argparse.Namespace) -> int:
    import logging

    from bot.local.sandbox import Sandbox

    logging.basicConfig(level=logging.WARNING)
    out = io.StringIO()

    def print(line: str) -> None:  # to the terminal and, with --write-docs, the docs
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        out.write(line + "\n")

    kw = dict(connections=args.connections, warmup=args.warmup, duration=args.duration)
    print(f"{args.connections} connections, {args.duration:.0f}s per run (+{args.warmup:.0f}s warm-up), "
          f"{args.rounds} rounds of hello then introspect, load generator in its own process; "
          f"{args.algorithm} tokens" + (", gc.freeze() after start-up" if args.gc_freeze else ""))
    hellos: list[Result] = []
    intros: list[Result] = []
    # The production sweep interval (Runtime's default), not the sandbox's brisk test one.
    async with Sandbox(algorithm=args.algorithm, sweep_interval=1.0) as box:
        token = await token_from_flow(box)
        url = f"{box.url}/oauth2/introspect"
        request = http_request(url, token, "payments-api", box.client_secret)
        runner, hello_url = await hello_server()
        if args.gc_freeze:  # what `gc.freeze()` at the end of start-up would do
            import gc

            gc.collect()
            gc.freeze()
        try:
            for n in range(1, args.rounds + 1):
                hellos.append(await run_load(hello_url, http_request(
                    hello_url, token, "payments-api", box.client_secret), b"Hello, world", **kw))
                print(_line(f"{n}. hello", hellos[-1]))
                intros.append(await run_load(url, request, b'"active": true', **kw))
                print(_line(f"{n}. introspect", intros[-1]))
        finally:
            await runner.cleanup()
        await box.bot.introspector.flush()
        await box.settle()
        async with box.bot.db.read() as conn:
            from sqlalchemy import select

            from bot.store.schema import token_uses

            counted = (await conn.execute(select(token_uses.c.count))).scalar()
    # Other work on a shared machine only ever slows a run down: the best run of each is
    # the closest to what the code does.
    hello = max(hellos, key=lambda r: r.rate)
    intro = max(intros, key=lambda r: r.rate)
    print("best runs:")
    print(_line("hello", hello))
    print(_line("introspect", intro))
    ratio = intro.rate / hello.rate if hello.rate else 0.0
    per_cpu = ((intro.requests / intro.server_cpu) / (hello.requests / hello.server_cpu)
               if intro.server_cpu and hello.server_cpu else 0.0)
    print(f"introspect/hello ratio R = {ratio:.2f}   (target >= 0.5; p99 target <= 20 ms)")
    print(f"requests per server CPU second, introspect/hello = {per_cpu:.2f}")
    print(f"uses counted in token_uses: {counted} (every introspection, warm-ups included)")
    errors = sum(r.errors + r.unexpected for r in intros) + sum(r.errors for r in hellos)
    ok = errors == 0
    if args.write_docs and ok:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from bench._common import write_section

        write_section("introspect", out.getvalue(), "python bench/introspect.py")
    return 0 if ok else 1


# ------------------------------------------------- PostgreSQL and replicas (serve processes)


async def token_from_process(bot: Any) -> str:
    """A token through the real flow (command, two approvals, reveal) on `serve` processes."""
    from bench._common import wait_healthy

    user, emu = "U0REQ00000", bot.emulator
    await wait_healthy(bot.url)
    await bot.slack.command(user, "payments-write 30m INC-4521 bench")
    rid = await _poll(lambda: bot.query("SELECT id FROM requests"), "the request")
    for k, approver in enumerate(("U0APP00000", "U0APP00001")):
        sender = bot.senders[k % len(bot.senders)]
        await sender.click(approver, "bg_approve", rid[0][0], channel_id="C0REVIEWS")
    await _poll(lambda: bot.query("SELECT id FROM requests WHERE state = 'issued'"), "the token")

    async def dm() -> list[Any]:
        return [c for c in emu.calls if c.method == "chat.postMessage" and c.fault is None
                and str(c.params.get("channel", "")) == user]

    await _poll(dm, "the token DM")
    await bot.slack.click(user, "bg_reveal", rid[0][0], channel_id=emu.dm_channel_for(user))

    async def views() -> list[Any]:
        return list(emu.views)

    for block in (await _poll(views, "the reveal modal"))[-1].view.get("blocks", []):
        found = _JWT.search(block.get("text", {}).get("text", ""))
        if found:
            return found.group(0)
    raise RuntimeError("the reveal modal held no token")


async def _poll(fetch: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := await fetch():
            return got
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} never came")


def _name(postgres: str | None, replicas: int) -> str:
    return ("PostgreSQL" if postgres else "SQLite") + (f" x{replicas}" if replicas > 1 else "")


async def main_processes(args: argparse.Namespace) -> int:
    """Hello, then each configuration's `serve` processes, round after round, all in one run;
    the best run of each and the same-run ratios at the end."""
    import contextlib
    import tempfile

    from bench._common import BotProcess, load_policy, write_section

    out = io.StringIO()

    def print(line: str) -> None:  # to the terminal and, with --write-docs, the docs
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        out.write(line + "\n")

    from bench._common import configurations

    runs = configurations(args)
    names = [_name(*r) for r in runs]
    width = max(14, *(len(f"{args.rounds}. {n}") for n in names))
    kw = dict(connections=args.connections, warmup=args.warmup, duration=args.duration)
    print(f"{args.connections} connections, {args.duration:g}s per run (+{args.warmup:g}s warm-up), "
          f"{args.rounds} rounds of hello then " + ", ".join(names) + " (`python -m bot serve` "
          "processes; replicas share the connections), load generator in its own process; "
          f"{args.algorithm} tokens; CPU is % of one core")
    results: dict[str, list[Result]] = {name: [] for name in ["hello", *names]}
    counted: dict[str, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        bots = []
        for postgres, replicas in runs:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bg-bench-"))
            bot = await BotProcess(load_policy(1, 2, algorithm=args.algorithm), tmp,
                                   postgres=postgres, replicas=replicas).start()
            stack.push_async_callback(bot.stop)
            bots.append((bot, await token_from_process(bot)))
        runner, hello_url = await hello_server()
        stack.push_async_callback(runner.cleanup)
        hello_request = http_request(hello_url, bots[0][1], "payments-api", bots[0][0].client_secret)
        for n in range(1, args.rounds + 1):
            results["hello"].append(await run_load(hello_url, hello_request, b"Hello, world", **kw))
            print(_line(f"{n}. hello", results["hello"][-1], width))
            for name, (bot, token) in zip(names, bots, strict=True):
                urls = [f"{u}/oauth2/introspect" for u in bot.urls]
                requests = [http_request(u, token, "payments-api", bot.client_secret) for u in urls]
                results[name].append(await run_load(urls, requests, b'"active": true',
                                                    server_pids=bot.pids,
                                                    db_pids=bot.database.backend_pids, **kw))
                print(_line(f"{n}. {name}", results[name][-1], width))
        for name, (bot, _token) in zip(names, bots, strict=True):
            await asyncio.sleep(1.5)  # the introspectors' use counts reach the database
            counted[name] = int((await bot.query('SELECT sum("count") FROM token_uses'))[0][0] or 0)
    best = {name: max(rs, key=lambda r: r.rate) for name, rs in results.items()}
    print("best runs:")
    for name, r in best.items():
        print(_line(name, r, width))
    if best["hello"].rate:
        print("introspect/hello ratio R: " + ", ".join(
            f"{name} {best[name].rate / best['hello'].rate:.2f}" for name in names))
    for i, base in enumerate(names):
        for other in names[i + 1:]:
            a, b = best[other], best[base]
            per_cpu = ((a.requests / a.server_cpu) / (b.requests / b.server_cpu)
                       if a.server_cpu and b.server_cpu else 0.0)
            print(f"same run, {other} / {base}: throughput {a.rate / b.rate:.2f}x, "
                  f"p99 {a.p99_ms / b.p99_ms:.2f}x, requests per bot CPU second {per_cpu:.2f}x")
    print("uses counted in token_uses: " + ", ".join(f"{n} {c}" for n, c in counted.items())
          + " (every introspection, warm-ups included)")
    errors = sum(r.errors + r.unexpected for rs in results.values() for r in rs)
    if errors:
        print(f"FAILED: {errors} errors or unexpected answers")
    if args.write_docs and not errors:
        section = "introspect_postgres" if any(p for p, _ in runs) else "introspect_replicas"
        command = "python bench/introspect.py" + "".join(
            f" {flag}" for flag, on in [("--postgres URL", args.postgres),
                                        (f"--replicas {args.replicas}", args.replicas > 1),
                                        ("--compare", args.compare)] if on)
        write_section(section, out.getvalue(), command)
    return 1 if errors else 0


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/introspect.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--algorithm", default="RS256", choices=["RS256", "ES256", "EdDSA"])
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() once started: full collections skip the start-up heap")
    p.add_argument("--postgres", metavar="URL",
                   help="run the bot (`python -m bot serve`) on PostgreSQL: an admin URL such as "
                        "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres; the bench creates "
                        "a fresh database bench_<random> there and drops it at the end")
    p.add_argument("--replicas", type=int, default=1,
                   help="N serve processes on the one database, the connections spread over them")
    p.add_argument("--compare", action="store_true",
                   help="in the same run, also SQLite with one replica (and, with --replicas N, "
                        "the same backend with one replica), and print the ratios")
    p.add_argument("--write-docs", action="store_true",
                   help="replace the introspect section (introspect_postgres or "
                        "introspect_replicas with those options) of docs/performance.md")
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error("--replicas takes a whole number of at least 1")
    if args.postgres and not args.postgres.startswith("postgresql"):
        p.error("--postgres takes a URL such as postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    if args.postgres or args.replicas > 1 or args.compare:
        return asyncio.run(main_processes(args))
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
