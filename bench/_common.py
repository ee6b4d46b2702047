"""Shared by the benchmarks: a load generator that runs in its own process,
percentiles, a policy sized for load, and writing results into docs/performance.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import re
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from bot.slack.signature import compute_signature

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(name: str, ms: list[float]) -> str:
    return (f"{name}: n={len(ms)} p50={pct(ms, 50):.1f}ms p99={pct(ms, 99):.1f}ms "
            f"max={max(ms):.1f}ms mean={statistics.fmean(ms):.1f}ms")


def load_policy(n_requesters: int, n_approvers: int, *, quorum: int = 2, trigger_timeout: str = "2s",
                delivery: str = "reveal", rate_limit: int = 100_000,
                extra: str = "", algorithm: str = "RS256") -> Callable[[str, str], str]:
    """The sandbox's policy sized for load: (probe_url, client_secret) -> policy text."""
    from bot.local.sandbox import sandbox_policy

    requesters = [f"U0REQ{i:05d}" for i in range(n_requesters)]
    approvers = [f"U0APP{i:05d}" for i in range(n_approvers)]
    return lambda probe_url, client_secret: sandbox_policy(
        probe_url, client_secret, delivery=delivery, algorithm=algorithm, quorum=quorum,
        requesters=requesters,
        approvers=approvers, rate_limit=rate_limit, auth_timeout=trigger_timeout, extra=extra)


class WebhookSink:
    """Webhook receivers on loopback for the benches: each checks every signature and
    counts events by id (a repeat is counted apart, as a duplicate)."""

    EVENTS = ["requested", "approved", "issued", "revealed", "used", "revoked", "expired",
              "refused", "alert"]

    def __init__(self, n: int) -> None:
        import secrets

        self.n = n
        self.secrets = [secrets.token_hex(32) for _ in range(n)]
        self.ids: list[set[str]] = [set() for _ in range(n)]
        self.duplicates = [0] * n
        self.bad_signatures = 0
        self.last_at = [0.0] * n
        self.urls: list[str] = []

    async def start(self) -> WebhookSink:
        import hashlib
        import hmac

        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            i = int(request.match_info["i"])
            body = await request.read()
            ts = request.headers.get("X-Breakglass-Timestamp", "")
            want = "v1=" + hmac.new(self.secrets[i].encode(), ts.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
            if not hmac.compare_digest(want, request.headers.get("X-Breakglass-Signature", "")):
                self.bad_signatures += 1
                return web.Response(status=401)
            event_id = json.loads(body)["id"]
            if event_id in self.ids[i]:
                self.duplicates[i] += 1
            self.ids[i].add(event_id)
            self.last_at[i] = time.perf_counter()
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook/{i}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
        self.urls = [f"http://127.0.0.1:{port}/hook/{i}" for i in range(self.n)]
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    def reset(self) -> None:
        """Forget what arrived: each bench scenario starts a bot of its own."""
        self.ids = [set() for _ in range(self.n)]
        self.duplicates = [0] * self.n
        self.bad_signatures = 0
        self.last_at = [0.0] * self.n

    def policy(self) -> str:
        return "".join(f'\n[[webhooks]]\nurl = "{url}"\nsecret_env = "BENCH_WEBHOOK_{i}"\n'
                       f"events = {json.dumps(self.EVENTS)}\n" for i, url in enumerate(self.urls))

    def env(self) -> dict[str, str]:
        return {f"BENCH_WEBHOOK_{i}": s for i, s in enumerate(self.secrets)}

    def delivered(self) -> list[int]:
        return [len(ids) for ids in self.ids]


def command_fields(user: str, text: str, response_url: str) -> dict[str, str]:
    return {"token": "bench", "team_id": "T0EMU", "team_domain": "emulated",
            "channel_id": "C0GENERAL", "channel_name": "general", "user_id": user,
            "user_name": user.lower(), "command": "/breakglass", "text": text,
            "api_app_id": "A0EMU", "response_url": response_url,
            "trigger_id": f"{time.time_ns()}.1.bench"}


def click_fields(user: str, action_id: str, value: str, channel: str, response_url: str) -> dict[str, str]:
    payload = {"type": "block_actions", "user": {"id": user, "username": user.lower()},
               "api_app_id": "A0EMU", "token": "bench", "trigger_id": f"{time.time_ns()}.2.bench",
               "team": {"id": "T0EMU", "domain": "emulated"},
               "container": {"type": "message", "channel_id": channel, "is_ephemeral": False},
               "channel": {"id": channel, "name": channel.lower()}, "response_url": response_url,
               "actions": [{"action_id": action_id, "block_id": "bg", "value": value,
                            "type": "button", "action_ts": f"{time.time():.6f}"}]}
    return {"payload": json.dumps(payload)}


async def _fire(url: str | list[str], secret: str, forms: list[dict[str, str]],
                concurrency: int) -> list[float]:
    """POST each form, `concurrency` at once; latency in ms for each. With several URLs
    (replicas), form i goes to url i mod N: commands and clicks spread round-robin.

    Bodies are signed before the clock starts and the connections are opened
    (with GET /healthz) first, so the figures are the server's answer time plus
    the client's own cost, which the bare-handler baseline shows."""
    urls = [url] if isinstance(url, str) else list(url)
    latencies: list[float] = []
    ts = str(int(time.time()))
    signed = []
    for i, form in enumerate(forms):
        body = urlencode(form).encode()
        signed.append((urls[i % len(urls)], body,
                       {"X-Slack-Request-Timestamp": ts,
                        "X-Slack-Signature": compute_signature(secret, ts, body),
                        "Content-Type": "application/x-www-form-urlencoded"}))
    connector = aiohttp.TCPConnector(limit=concurrency * len(urls),
                                     limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def warm(target: str) -> None:
            async with session.get(target.rsplit("/slack/events", 1)[0] + "/healthz") as resp:
                await resp.read()

        await asyncio.gather(*(warm(u) for u in urls
                               for _ in range(max(1, concurrency // len(urls)))))
        queue: asyncio.Queue[tuple[str, bytes, dict[str, str]]] = asyncio.Queue()
        for item in signed:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                target, body, headers = queue.get_nowait()
                start = time.perf_counter()
                async with session.post(target, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status} from {target}")
                latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _generator_loop(jobs: Any, results: Any) -> None:
    while (job := jobs.get()) is not None:
        results.put(asyncio.run(_fire(*job)))


class LoadGenerator:
    """A load generator in its own process, so it does not share the bot's event loop.
    Started once (Python's start-up is not the bot's time) and given one job at a time."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_generator_loop, args=(self._jobs, self._results))

    async def __aenter__(self) -> LoadGenerator:
        self._proc.start()
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def fire(self, url: str | list[str], secret: str, forms: list[dict[str, str]],
                   concurrency: int) -> list[float]:
        self._jobs.put((url, secret, forms, concurrency))
        result: list[float] = await asyncio.to_thread(self._results.get)
        return result

    async def __aexit__(self, *exc: object) -> None:
        self._jobs.put(None)
        await asyncio.to_thread(self._proc.join)


async def fire_in_process(url: str | list[str], secret: str, forms: list[dict[str, str]],
                          concurrency: int) -> list[float]:
    """One job on a load generator of its own."""
    async with LoadGenerator() as gen:
        return await gen.fire(url, secret, forms, concurrency)


def write_section(name: str, body: str, command: str) -> None:
    """Replace (or add) the section between markers for `name` in docs/performance.md."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"<!-- bench:{name} -->\n"
             f"Measured {stamp} with `{command}`:\n\n```\n{body.strip()}\n```\n"
             f"<!-- /bench:{name} -->")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->",
                         re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


async def wait_healthy(base_url: str, attempts: int = 300) -> None:
    """Poll GET /healthz until the bot answers 200 (every 0.1 s)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(attempts):
            try:
                async with http.get(f"{base_url}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{base_url}/healthz never answered 200")


class BenchDatabase:
    """The bot's database for one bench: a SQLite file in `tmp`, or, given a PostgreSQL
    admin URL, a fresh database `bench_<random>` on that server, dropped at the end.
    The bench reads it through SQLAlchemy (bot.store.db.Database), whichever backend."""

    def __init__(self, tmp: Path, admin_url: str | None = None) -> None:
        self.admin_url = admin_url
        self.name: str | None = None
        self.url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
        self._db: Any = None

    @property
    def backend(self) -> str:
        return "PostgreSQL" if self.admin_url else "SQLite"

    async def _admin(self, sql: str) -> None:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        assert self.admin_url is not None
        engine = create_async_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    async def create(self) -> str:
        """Where the bot keeps its data (the bot makes its tables when it starts)."""
        if self.admin_url is not None:
            import secrets

            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import SQLAlchemyError

            name = f"bench_{secrets.token_hex(5)}"
            try:
                await self._admin(f'CREATE DATABASE "{name}"')
            except (OSError, SQLAlchemyError) as exc:
                shown = make_url(self.admin_url).render_as_string(hide_password=True)
                raise SystemExit(f"--postgres {shown}: could not create a database there "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0]}); give the "
                                 "URL of a running server and a role that may CREATE DATABASE") from None
            self.name = name
            self.url = make_url(self.admin_url).set(database=self.name).render_as_string(
                hide_password=False)
        return self.url

    async def query(self, sql: str, **params: object) -> list[tuple[Any, ...]]:
        """Rows of one read (`:name` parameters), on either backend."""
        from sqlalchemy import text

        from bot.store.db import Database

        if self._db is None:
            self._db = Database(self.url)
        async with self._db.read() as conn:
            return [tuple(r) for r in (await conn.execute(text(sql), params)).all()]

    async def backend_pids(self) -> list[int]:
        """PostgreSQL's server processes serving this database (the bots' connections);
        none on SQLite."""
        if self.admin_url is None:
            return []
        rows = await self.query("SELECT pid FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return [int(r[0]) for r in rows]

    async def drop(self) -> None:
        if self._db is not None:
            await self._db.dispose()
            self._db = None
        if self.admin_url is not None and self.name is not None:
            await self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.name = None


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc); 0 if gone."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (Linux /proc/stat)."""
    import os

    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Where the CPU went between start() and stop(), as shares of one core: the bot's
    processes, the load generator, this process (the Slack emulator, the probe target,
    webhook receivers), PostgreSQL's processes serving the bot's database, and the rest
    of the machine. On two cores, whatever sits near 100% (or all of them near 200%
    together) is what limits the run."""

    def __init__(self, bot: BotProcess, load_pid: int | None) -> None:
        self.bot, self.load_pid = bot, load_pid

    async def _pids(self) -> dict[str, list[int]]:
        return {"bot": self.bot.pids, "load generator": [self.load_pid] if self.load_pid else [],
                "PostgreSQL": await self.bot.database.backend_pids()}

    async def start(self) -> None:
        self.first = {pid: proc_cpu_seconds(pid) for pids in (await self._pids()).values()
                      for pid in pids}
        self.own, self.machine, self.wall = time.process_time(), machine_cpu_seconds(), time.perf_counter()

    async def stop(self) -> str:
        groups = await self._pids()  # a connection opened during the run counts whole
        used = {name: sum(max(0.0, proc_cpu_seconds(pid) - self.first.get(pid, 0.0))
                          for pid in pids) for name, pids in groups.items()}
        used["this process"] = time.process_time() - self.own
        machine = machine_cpu_seconds() - self.machine
        wall = time.perf_counter() - self.wall
        if not self.bot.database.admin_url:
            del used["PostgreSQL"]
        rest = max(0.0, machine - sum(used.values()))
        return ("CPU during the run, as shares of one core: " + ", ".join(
            f"{name} {v / wall:.0%}" for name, v in used.items())
            + f", rest of the machine {rest / wall:.0%} (all together {machine / wall:.0%} "
            f"of {100 * cpu_count()}%)")


def cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class BotProcess:
    """`python -m bot serve` in processes of their own (`replicas` of them sharing one
    database: SQLite in `tmp`, or a fresh PostgreSQL database given `postgres`, an admin
    URL), with the Slack emulator and the probe target in this process, so the bot's
    event loops serve only the bot. `url` is the first replica; `urls` all of them."""

    def __init__(self, policy: Callable[[str, str], str], tmp: str,
                 env: dict[str, str] | None = None, *, postgres: str | None = None,
                 replicas: int = 1) -> None:
        self.policy_for = policy
        self.tmp = Path(tmp)
        self.extra_env = env or {}
        self.database = BenchDatabase(self.tmp, postgres)
        self.replicas = replicas
        self.procs: list[Any] = []

    @property
    def label(self) -> str:
        return f"{self.database.backend}, {self.replicas} replica{'s' if self.replicas > 1 else ''}"

    async def start(self) -> BotProcess:
        import secrets

        from bot.local.emulator import SlackEmulator
        from bot.local.sandbox import ProbeTarget

        self.probes = ProbeTarget()
        await self.probes.start()
        self.emulator = SlackEmulator()
        await self.emulator.start()
        self.signing_secret = secrets.token_hex(16)
        self.client_secret = secrets.token_urlsafe(16)
        policy = self.policy_for(self.probes.url, self.client_secret)
        (self.tmp / "policy.toml").write_text(policy)
        try:
            await self._start_replicas(await self.database.create())
        except BaseException:
            await self.stop()  # no serve process and no bench database is left behind
            raise
        self.slack = self.senders[0]
        return self

    async def _start_replicas(self, database_url: str) -> None:
        import os
        import secrets
        import socket
        import subprocess
        import sys

        from bot.core.kdf import new_master_key
        from bot.local.emulator import SlackSender

        env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(8),
               "SLACK_SIGNING_SECRET": self.signing_secret, "SLACK_API_URL": self.emulator.api_url,
               "BREAKGLASS_POLICY": str(self.tmp / "policy.toml"),
               "BREAKGLASS_DATABASE_URL": database_url,
               "BREAKGLASS_MASTER_KEY": new_master_key(), "BREAKGLASS_HOST": "127.0.0.1",
               "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0",  # replicas on one host: no fixed port
               **self.extra_env}
        self.urls = []
        for i in range(self.replicas):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.procs.append(subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "bot", "serve", "--log-level", "ERROR"],
                env={**env, "BREAKGLASS_PORT": str(port)}))
            self.urls.append(f"http://127.0.0.1:{port}")
            if i == 0:  # the first one makes the tables; the others start on them together
                await wait_healthy(self.urls[0])
        await asyncio.gather(*(wait_healthy(u) for u in self.urls[1:]))
        self.url = self.urls[0]
        self.events_urls = [f"{u}/slack/events" for u in self.urls]
        self.senders = [SlackSender(u, self.signing_secret, self.emulator)
                        for u in self.events_urls]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def query(self, sql: str, **params: object) -> list[tuple[Any, ...]]:
        """Rows of one read of the bot's database (`:name` parameters), either backend."""
        return await self.database.query(sql, **params)

    async def stop(self) -> None:
        for sender in getattr(self, "senders", []):
            await sender.close()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            await asyncio.to_thread(proc.wait, 30)
        await self.database.drop()
        await self.emulator.stop()
        await self.probes.stop()


def configurations(args: argparse.Namespace) -> list[tuple[str | None, int]]:
    """(PostgreSQL admin URL or None for SQLite, replicas) for each run: the one asked
    for, after, with --compare, the baselines measured in the same run."""
    asked = (args.postgres, args.replicas)
    runs: list[tuple[str | None, int]] = []
    if args.compare:
        runs.append((None, 1))
        if args.replicas > 1:
            runs.append((args.postgres, 1))
    return [r for i, r in enumerate(runs) if r not in runs[:i] and r != asked] + [asked]
