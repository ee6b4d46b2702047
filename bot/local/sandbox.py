"""A whole breakglass world on loopback: the Slack emulator, a probe target, a
policy, a database (SQLite in a temp dir unless given a URL), and the real bot
over real HTTP.

`breakglass demo` runs its story in one; the tests build on it too.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ..config import Settings, parse_trusted_proxies
from ..core import client_secrets
from ..core.clock import Clock
from ..core.kdf import new_master_key
from ..core.policy import parse_policy
from ..runtime import Runtime
from .emulator import SlackEmulator, SlackSender

ALICE, BOB, CAROL, DAVE, MALLORY = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE", "U0MALLORY"
REVIEWS, INCIDENT = "C0REVIEWS", "C0INCIDENT"
PEOPLE = {ALICE: "alice (on call)", BOB: "bob (SRE lead)", CAROL: "carol (SRE lead)",
          DAVE: "dave (SRE lead)", MALLORY: "mallory (not on call)"}


def sandbox_policy(probe_url: str, client_secret: str, *, delivery: str = "reveal",
                   algorithm: str = "RS256", quorum: int = 2, escalate: str | None = None,
                   extra: str = "", requesters: Sequence[str] = (ALICE, BOB),
                   approvers: Sequence[str] = (BOB, CAROL, DAVE), expire_after: str = "30m",
                   rate_limit: int | None = None, auth_timeout: str = "2s",
                   incident_pattern: str | None = None,
                   tokens_extra: str = "", scope_extra: str = "",
                   approver_usergroup: str | None = None) -> str:
    """The demo's policy; the keyword arguments size it for tests and benchmarks."""
    # A real scrypt hash, at the cheapest cost the policy accepts (tests start many bots).
    digest = client_secrets.hash_secret(client_secret, ln=client_secrets.MIN_LN)
    escalate_line = f'escalate_after = "{escalate}"' if escalate else ""
    rate_line = f"rate_limit = {rate_limit}" if rate_limit is not None else ""
    if incident_pattern is not None:  # a JSON string is a TOML basic string
        rate_line += f"\nincident_pattern = {json.dumps(incident_pattern)}"
    usergroup_line = f'usergroup = "{approver_usergroup}"' if approver_usergroup else ""
    return f"""
[slack]
reviewer_channel = "{REVIEWS}"
incident_channel = "{INCIDENT}"

[tokens]
issuer = "https://breakglass.example.internal"
algorithm = "{algorithm}"
delivery = "{delivery}"
default_ttl = "15m"
max_ttl = "1h"
{tokens_extra}

[requests]
expire_after = "{expire_after}"
{escalate_line}
{rate_line}

[groups.oncall]
members = {json.dumps(list(requesters))}

[groups.sre-leads]
members = {json.dumps(list(approvers))}
{usergroup_line}

[triggers.primary-auth-down]
description = "Primary auth provider fails its health check"
http = "{probe_url}/auth/health"
holds_when = "down"
timeout = "{auth_timeout}"

[triggers.primary-db-down]
description = "Primary database fails its health check"
http = "{probe_url}/db/health"
holds_when = "down"
timeout = "1s"

[scopes.payments-write]
description = "Write access to the payments API"
audience = "payments-api"
permissions = ["payments:read", "payments:write"]
requesters = ["oncall"]
approvers = ["sre-leads"]
quorum = {quorum}
max_ttl = "30m"
triggers = ["primary-auth-down"]
{scope_extra}

[scopes.db-admin]
description = "Admin on the primary database"
audience = "db-api"
permissions = ["db:admin"]
requesters = ["oncall"]
approvers = ["sre-leads"]
quorum = 1
max_ttl = "15m"
triggers = ["primary-db-down"]

[clients.payments-api]
secret_hash = "{digest}"
audiences = ["payments-api"]
{extra}
"""


class ProbeTarget:
    """Health endpoints the triggers probe; each one's answer can be changed live."""

    def __init__(self) -> None:
        self.status: dict[str, int | None] = {"auth": 503, "db": 200}  # None = hang
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _health(self, request: web.Request) -> web.Response:
        status = self.status.get(request.match_info["name"], 404)
        if status is None:
            import asyncio

            await asyncio.sleep(3600)
            status = 200
        return web.Response(status=status, text=f"{status}\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name}/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


@dataclass
class Sandbox:
    """Everything running; `await sandbox.start()`, then drive it with `sandbox.slack`."""

    delivery: str = "reveal"
    algorithm: str = "RS256"
    quorum: int = 2
    escalate: str | None = None
    rate_limit: int | None = None
    incident_pattern: str | None = None
    extra_policy: str = ""
    tokens_extra: str = ""  # lines in [tokens]
    scope_extra: str = ""  # lines in [scopes.payments-write]
    approver_usergroup: str | None = None  # a Slack user group for sre-leads
    clock: Clock | None = None
    directory: Path | None = None
    database_url: str | None = None  # default: SQLite, breakglass.db in `directory`
    sweep_interval: float = 0.2
    signing_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    bot_token: str = field(default_factory=lambda: "xoxb-" + secrets.token_hex(12))
    master_key: str = field(default_factory=new_master_key)
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    metrics_token: str | None = None
    trusted_proxies: str = ""  # as BREAKGLASS_TRUSTED_PROXIES
    env: dict[str, str] | None = None  # the bot's environment for [[webhooks]] secrets

    async def start(self) -> Sandbox:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if self.directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="breakglass-")
            self.directory = Path(self._tmp.name)
        self.emulator = SlackEmulator(bot_token=self.bot_token)
        await self.emulator.start()
        for user, name in PEOPLE.items():
            self.emulator.set_user(user, name=name.split()[0], real_name=name)
        self.emulator.channel_names.update({REVIEWS: "break-glass-reviews",
                                            INCIDENT: "incident-live"})
        self.probes = ProbeTarget()
        await self.probes.start()
        self.policy_text = sandbox_policy(self.probes.url, self.client_secret,
                                          delivery=self.delivery, algorithm=self.algorithm,
                                          quorum=self.quorum, escalate=self.escalate,
                                          rate_limit=self.rate_limit,
                                          incident_pattern=self.incident_pattern,
                                          extra=self.extra_policy,
                                          tokens_extra=self.tokens_extra,
                                          scope_extra=self.scope_extra,
                                          approver_usergroup=self.approver_usergroup)
        (self.directory / "breakglass.toml").write_text(self.policy_text)
        if self.database_url is None:
            self.database_url = f"sqlite+aiosqlite:///{self.directory / 'breakglass.db'}"
        self.settings = Settings(
            bot_token=self.bot_token, signing_secret=self.signing_secret, app_token=None,
            api_url=self.emulator.api_url, policy_path=str(self.directory / "breakglass.toml"),
            database_url=self.database_url, master_key=self.master_key, host="127.0.0.1", port=0,
            metrics_addr="127.0.0.1:0", metrics_token=self.metrics_token,
            trusted_proxies=parse_trusted_proxies(self.trusted_proxies)[0])
        await self.start_bot()
        return self

    async def start_bot(self) -> None:
        policy = parse_policy(self.policy_text)
        self.bot = Runtime(self.settings, policy, clock=self.clock,
                           sweep_interval=self.sweep_interval, policy_text=self.policy_text,
                           env=self.env)
        await self.bot.start()
        port = await self.bot.serve_http("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{self.bot.metrics_port}/metrics"
        self.slack = SlackSender(f"{self.url}/slack/events", self.signing_secret, self.emulator)

    async def stop_bot(self) -> None:
        await self.slack.close()
        await self.bot.stop(drain_seconds=2.0)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.stop_bot()
        await self.probes.stop()
        await self.emulator.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def __aenter__(self) -> Sandbox:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # -- conveniences for stories and tests ------------------------------------

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until the bot's background work and its outbox are done."""
        await self.bot.idle()
        await self.emulator.wait_for(lambda: True, timeout=0.01)
        left = await self.bot.dispatcher.drain(timeout)
        if left:
            raise TimeoutError(f"{left} outbox row(s) still pending")
        await self.bot.idle()

    def card(self, request_id: str) -> Any:
        for m in self.emulator.messages(REVIEWS):
            if f"request {request_id}" in (m.text or ""):
                return m
        return None

    def latest_request_id(self) -> str:
        import re

        for m in reversed(self.emulator.messages(REVIEWS)):
            found = re.search(r"request (R[0-9A-Z]{7})", m.text or "")
            if found:
                return found.group(1)
        raise LookupError("no approval card posted")
