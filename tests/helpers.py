"""Small helpers shared by the HTTP tests, and `breakglass serve` as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
from sqlalchemy import text
from webhook_receiver import Receiver

from bot.local.emulator import SentRequest, SlackEmulator
from bot.local.sandbox import Sandbox
from bot.store.db import Database

ACK_LIMIT = 3.0  # Slack's limit for answering a command or a click


async def timed(call: Awaitable[SentRequest]) -> SentRequest:
    """The HTTP answer to a command or click; it must come within Slack's 3 s."""
    started = time.perf_counter()
    resp = await call
    elapsed = time.perf_counter() - started
    assert resp.status == 200, resp.body
    assert elapsed < ACK_LIMIT, f"answered after {elapsed:.2f}s"
    return resp


async def command(box: Sandbox, user: str, text: str) -> SentRequest:
    """A slash command, answered within Slack's limit, and the work it started done."""
    resp = await timed(box.slack.command(user, text))
    await box.settle()
    return resp


def webhook_entry(url: str, env: str, events: list[str], **extra: str) -> str:
    """One `[[webhooks]]` entry of a policy."""
    lines = [f'url = "{url}"', f'secret_env = "{env}"', f"events = {json.dumps(events)}"]
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n[[webhooks]]\n" + "\n".join(lines) + "\n"


def webhooks_policy(*hooks: tuple[Receiver, list[str]] | str) -> tuple[str, dict[str, str]]:
    """Policy text with a `[[webhooks]]` entry per (receiver, events) (a string is taken
    as policy text as it is), and the environment holding each entry's secret."""
    env: dict[str, str] = {}
    text = ""
    for i, h in enumerate(hooks):
        if isinstance(h, str):
            text += h
            continue
        receiver, events = h
        assert receiver.secret is not None
        name = f"TEST_WEBHOOK_SECRET_{i}"
        env[name] = receiver.secret.decode()
        text += webhook_entry(receiver.url, name, events)
    return text, env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`python -m bot serve` as a child process."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.env = {**env, "BREAKGLASS_PORT": str(self.port), "BREAKGLASS_HOST": "127.0.0.1",
                    "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0"}
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "bot", "serve"], env=self.env, stdout=self._log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {self.proc.returncode}: "
                                       f"{self.log_path.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise TimeoutError(f"serve did not answer /healthz: {self.log_path.read_text()[-2000:]}")

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return await asyncio.to_thread(self.proc.wait, 20)
        finally:
            self._log.close()


def base_env(tmp_path: Path, emu: SlackEmulator, policy: str, token: str, secret: str,
             master: str, database_url: str | None = None) -> dict[str, str]:
    policy_path = tmp_path / "breakglass.toml"
    policy_path.write_text(policy)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    env.update({
        "SLACK_BOT_TOKEN": token, "SLACK_SIGNING_SECRET": secret, "SLACK_API_URL": emu.api_url,
        "BREAKGLASS_POLICY": str(policy_path), "BREAKGLASS_MASTER_KEY": master,
        "BREAKGLASS_DATABASE_URL": database_url or f"sqlite+aiosqlite:///{tmp_path / 'breakglass.db'}",
        "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0",  # replicas on one host: no fixed port
    })
    return env


async def query(url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    """Rows of one read on the database at `url` (either backend)."""
    db = Database(url)
    try:
        async with db.read() as conn:
            return [tuple(r) for r in (await conn.execute(text(sql), params)).all()]
    finally:
        await db.dispose()
