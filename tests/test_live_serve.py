"""Live policy, live membership and keys (contract §7.3, §7.7) against a real
`python -m bot serve` process: a real policy file edited on disk, a real SIGHUP, the
real `breakglass keys` commands run beside it, the Slack emulator in this process.

- the file changes (no signal): a removed scope's live grant is revoked (DM edited,
  incident post) and its pending request cancelled, within the 10 s the contract allows;
- SIGHUP with a policy that does not validate: refused, alerted in the incident channel,
  logged, and the running policy keeps working;
- `keys rotate` reaches the running serve within 10 s: new tokens carry the new kid,
  a token signed before keeps verifying (introspection, JWKS); the rotation is audited
  with the OS user as actor and alerted;
- `keys rotate-master`: the running serve keeps working, says within 10 s that it needs
  the new master key at its next start, and starts with it;
- the membership re-check revokes a grant whose holder left the Slack user group.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from bot.core.kdf import new_master_key
from bot.local.emulator import SlackEmulator, SlackSender
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, REVIEWS, ProbeTarget, sandbox_policy

JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
CLIENT_SECRET = "live-serve-client-secret"
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs SIGHUP")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """One `breakglass serve` process and its world."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.token = "xoxb-" + os.urandom(10).hex()
        self.secret = os.urandom(16).hex()
        self.master = new_master_key()
        self.port = free_port()
        self.db_path = tmp / "breakglass.db"
        self.policy_path = tmp / "policy.toml"
        self.log_path = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Serve:
        self.emu = SlackEmulator(bot_token=self.token)
        await self.emu.start()
        self.probes = ProbeTarget()
        await self.probes.start()
        self.policy_text = sandbox_policy(self.probes.url, CLIENT_SECRET)
        self.policy_path.write_text(self.policy_text)
        self.slack = SlackSender(f"http://127.0.0.1:{self.port}/slack/events", self.secret,
                                 self.emu, timeout=5)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.slack.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        await self.probes.stop()
        await self.emu.stop()

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
        env.update({
            "SLACK_BOT_TOKEN": self.token, "SLACK_SIGNING_SECRET": self.secret,
            "SLACK_API_URL": self.emu.api_url, "BREAKGLASS_POLICY": str(self.policy_path),
            "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{self.db_path}",
            "BREAKGLASS_MASTER_KEY": self.master, "BREAKGLASS_HOST": "127.0.0.1",
            "BREAKGLASS_PORT": str(self.port), "BREAKGLASS_LOG_LEVEL": "INFO",
            "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0",
        })
        env.update(extra)
        return env

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "bot", "serve"], env=self.env(), stdout=log,
                stderr=subprocess.STDOUT)
        await self.until(self._healthy, 40, "serve never became healthy")

    async def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "serve did not stop"
            await asyncio.sleep(0.05)
        assert self.proc.returncode == 0, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sighup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    async def health(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{self.port}/healthz") as r:
                return dict(await r.json()) if r.status == 200 else {}

    async def _healthy(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"serve exited: {self.log()[-3000:]}"
        with contextlib.suppress(aiohttp.ClientError, OSError):
            return bool(await self.health())
        return False

    async def until(self, check: Any, timeout: float, what: str) -> float:
        """Wait until `await check()` (or `check()`) is true; the seconds it took."""
        started = time.monotonic()
        while True:
            got = check()
            if asyncio.iscoroutine(got):
                got = await got
            if got:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{what} (after {timeout}s); log:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bot", *args], env=self.env(**extra),  # noqa: S603
                              capture_output=True, text=True, timeout=60, check=False)

    # -- the database, read as an operator would ---------------------------------

    def sql(self, query: str, *params: Any) -> list[Any]:
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5)) as db:
            return db.execute(query, params).fetchall()

    def state(self, rid: str) -> str:
        return str(self.sql("SELECT state FROM requests WHERE id = ?", rid)[0][0])

    # -- people ----------------------------------------------------------------------

    def incident(self) -> list[str]:
        return [m.text for m in self.emu.messages(INCIDENT)]

    async def request(self, user: str, text: str) -> str:
        before = len(self.emu.messages(REVIEWS))
        resp = await self.slack.command(user, text)
        assert resp.status == 200
        await self.until(lambda: len(self.emu.messages(REVIEWS)) > before, 10, "no card posted")
        found = re.search(r"request (R[0-9A-Z]{7})", self.emu.messages(REVIEWS)[-1].text)
        assert found
        return found.group(1)

    async def grant(self) -> tuple[str, str]:
        """ALICE's payments-write grant, approved by BOB and CAROL; (request id, token)."""
        rid = await self.request(ALICE, "payments-write 30m INC-1 auth down")
        for approver in (BOB, CAROL):
            await self.slack.click(approver, "bg_approve", rid, channel_id=REVIEWS)
            await asyncio.sleep(0.05)
        await self.until(lambda: self.state(rid) == "issued", 10, f"{rid} not issued")
        dm = self.emu.dm_channel_for(ALICE)
        await self.until(lambda: any(rid in m.text for m in self.emu.messages(dm)), 10, "no DM")
        views = len(self.emu.views)
        await self.slack.click(ALICE, "bg_reveal", rid, channel_id=dm)
        await self.until(lambda: len(self.emu.views) > views, 10, "token never shown")
        tokens = JWT_RE.findall(json.dumps(self.emu.views[-1].view))
        assert len(tokens) == 1
        return rid, tokens[0]

    async def introspect(self, token: str) -> dict[str, Any]:
        auth = "Basic " + base64.b64encode(f"payments-api:{CLIENT_SECRET}".encode()).decode()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{self.port}/oauth2/introspect",
                              data={"token": token}, headers={"Authorization": auth}) as r:
                return dict(await r.json())

    async def jwks_kids(self) -> list[str]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{self.port}/.well-known/jwks.json") as r:
                return [k["kid"] for k in (await r.json())["keys"]]


def without_payments(text: str) -> str:
    start, end = text.index("[scopes.payments-write]"), text.index("[scopes.db-admin]")
    text = text[:start] + text[end:]
    start = text.index("[clients.payments-api]")
    end = text.index("\n\n", text.index("audiences", start))
    return text[:start] + text[end:]


async def test_serve_reloads_the_policy_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    async with Serve(tmp_path) as bot:
        await bot.start()
        rid, _ = await bot.grant()
        pending = await bot.request(BOB, "payments-write 20m INC-2 second pair of hands")

        # A real edit of the file, no signal: picked up within 10 s.
        started = time.monotonic()
        bot.policy_path.write_text(without_payments(bot.policy_text))
        await bot.until(lambda: bot.state(rid) == "revoked", 12, "grant not revoked by the reload")
        took = time.monotonic() - started
        assert took <= 10.5, f"reload took {took:.1f}s"
        await bot.until(lambda: bot.state(pending) == "cancelled", 5, "pending not cancelled")
        dm = bot.emu.dm_channel_for(ALICE)

        def dm_edited() -> bool:
            msg = next(m for m in bot.emu.messages(dm) if rid in m.text)
            return "revoked by a policy change" in msg.text and not JWT_RE.search(msg.text)

        await bot.until(dm_edited, 10, "DM not edited")
        await bot.until(lambda: any("*revoked*" in t and rid in t and "was removed" in t
                                    for t in bot.incident()), 10, "no revoked post")
        await bot.until(lambda: any("*cancelled*" in t and pending in t for t in bot.incident()),
                        10, "no cancelled post")
        await bot.until(lambda: any("*policy reloaded*" in t for t in bot.incident()), 10,
                        "reload not announced")

        # SIGHUP with a policy that does not validate: refused, alerted, logged.
        good = bot.policy_path.read_text()
        bot.policy_path.write_text(good.replace("quorum = 1", "quorum = 7"))
        bot.sighup()
        await bot.until(lambda: any(t.startswith(":rotating_light:") and "policy reload refused"
                                    in t and "quorum" in t for t in bot.incident()),
                        10, "refusal not posted")
        assert "policy reload refused" in bot.log()
        assert bot.sql("SELECT count(*) FROM audit_log WHERE event = 'policy_refused'")[0][0] == 1
        # The running policy (without payments-write, db-admin with quorum 1) still works.
        bot.probes.status["db"] = 503
        db_rid = await bot.request(ALICE, "db-admin 10m INC-3 primary db down")
        await bot.slack.click(BOB, "bg_approve", db_rid, channel_id=REVIEWS)
        await bot.until(lambda: bot.state(db_rid) == "issued", 10, "the old policy stopped working")
        assert bot.proc is not None and bot.proc.poll() is None
        await bot.stop()


async def test_serve_picks_up_key_rotations_without_restart(tmp_path: Path) -> None:
    async with Serve(tmp_path) as bot:
        await bot.start()
        rid1, token1 = await bot.grant()
        kid1 = jwt.get_unverified_header(token1)["kid"]

        done = bot.cli("keys", "rotate")
        assert done.returncode == 0, done.stderr
        kid2 = re.search(r"new signing key (\S+) is current", done.stdout).group(1)  # type: ignore[union-attr]

        async def serving_new_key() -> bool:
            return (await bot.jwks_kids())[0] == kid2

        took = await bot.until(serving_new_key, 10, "the serve did not pick up the new key")
        assert took <= 10
        _, token2 = await bot.grant()
        assert jwt.get_unverified_header(token2)["kid"] == kid2
        assert (await bot.introspect(token1))["active"] is True  # signed before the rotation
        assert (await bot.introspect(token2))["active"] is True
        assert {kid1, kid2} <= set(await bot.jwks_kids())
        rows = bot.sql("SELECT actor, details FROM audit_log WHERE event = 'key_rotated'")
        assert len(rows) == 1 and rows[0][0].startswith("os:")
        assert json.loads(rows[0][1])["kid"] == kid2
        kinds = [json.loads(d)["kind"] for (d,) in
                 bot.sql("SELECT details FROM audit_log WHERE event = 'alert'")]
        assert kinds == ["key_rotated"]
        await bot.until(lambda: any(t.startswith(":rotating_light:") and kid2 in t
                                    for t in bot.incident()), 10, "rotation not alerted")

        # rotate-master: the running serve keeps working with the keys it holds and says,
        # within 10 s, that it needs the new master key at its next start.
        new_master = new_master_key()
        done = bot.cli("keys", "rotate-master", BREAKGLASS_OLD_MASTER_KEY=bot.master,
                       BREAKGLASS_MASTER_KEY=new_master)
        assert done.returncode == 0, done.stderr

        async def told() -> bool:
            return (await bot.health()).get("signing_keys") == \
                "restart with the new BREAKGLASS_MASTER_KEY"

        assert await bot.until(told, 10, "the serve did not notice rotate-master") <= 10
        _, token3 = await bot.grant()
        assert jwt.get_unverified_header(token3)["kid"] == kid2
        assert (await bot.introspect(token3))["active"] is True
        rows = bot.sql("SELECT actor FROM audit_log WHERE event = 'master_key_rotated'")
        assert len(rows) == 1 and rows[0][0].startswith("os:")
        assert bot.sql("SELECT count(*) FROM audit_log WHERE event = 'alert' AND details LIKE "
                       "'%master_key_rotated%'")[0][0] == 1
        await bot.until(lambda: any(t.startswith(":rotating_light:") and "master key rotated" in t
                                    for t in bot.incident()), 10, "master rotation not alerted")
        assert "restart it with the new BREAKGLASS_MASTER_KEY" in bot.log()

        # SIGHUP reloads keys too; then a restart with the new master key.
        bot.sighup()
        await bot.until(lambda: "SIGHUP" in bot.log(), 5, "SIGHUP not handled")
        # The forced key check of the SIGHUP ran (the policy reload follows it): the
        # "restart it" error is logged once (operations.md), not at every check.
        await bot.until(lambda: "policy reloaded (sighup" in bot.log(), 10, "no SIGHUP reload")
        assert bot.log().count("restart it with the new BREAKGLASS_MASTER_KEY") == 1
        await bot.stop()
        bot.master = new_master
        await bot.start()
        assert (await bot.health())["signing_keys"] == "ok"
        assert (await bot.introspect(token1))["active"] is True
        assert bot.state(rid1) == "revealed"
        await bot.stop()


async def test_serve_membership_recheck_revokes(tmp_path: Path) -> None:
    async with Serve(tmp_path) as bot:
        bot.policy_text = bot.policy_text.replace(
            '[groups.oncall]\nmembers = ["U0ALICE", "U0BOB"]',
            '[groups.oncall]\nmembers = ["U0BOB"]\nusergroup = "S0ONCALL"',
        ) + '\n[alerts]\nmembership_recheck = "1s"\n'
        bot.policy_path.write_text(bot.policy_text)
        bot.emu.set_usergroup("S0ONCALL", [ALICE])
        await bot.start()
        rid, token = await bot.grant()
        bot.emu.set_usergroup("S0ONCALL", [])
        await bot.until(lambda: bot.state(rid) == "revoked", 10, "not revoked after leaving")
        await bot.until(lambda: any("*revoked*" in t and rid in t and "no longer in any requester "
                                    "group" in t for t in bot.incident()), 10, "no revoked post")
        assert (await bot.introspect(token)) == {"active": False}
        await bot.stop()


def seed_live_grants(db_path: Path, n: int) -> list[str]:
    """n live (revealed) payments-write grants, written straight into the database as
    the bot writes them (bench/reload.py does the same with 10,000)."""
    now = datetime.now(UTC)
    at = lambda d: d.strftime("%Y-%m-%d %H:%M:%S.%f")  # noqa: E731 - SQLAlchemy's SQLite format
    grant = json.dumps({"audience": "payments-api",
                        "permissions": ["payments:read", "payments:write"]})
    ids = [f"RS{i:06d}" for i in range(n)]
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db:
        db.executemany(
            "INSERT INTO requests (id, scope, requester, reason, incident, requested_ttl_s, "
            "ttl_s, state, triggers, created_at, expires_at, jti, kid, issued_at, "
            "token_expires_at, token_hash, revealed_at, \"grant\", version, drill) "
            "VALUES (?, 'payments-write', ?, 'seeded', 'INC-1', 1800, 1800, 'revealed', '[]', "
            "?, ?, ?, 'bg-seeded', ?, ?, ?, ?, ?, 2, 0)",
            [(rid, f"U0SEED{i % 50:04d}", at(now), at(now + timedelta(minutes=30)),
              os.urandom(16).hex(), at(now), at(now + timedelta(minutes=25)),
              os.urandom(32).hex(), at(now), grant) for i, rid in enumerate(ids)])
        db.commit()
    return ids


async def test_serve_killed_after_a_revocation_pass_finishes_its_follow_ups_after_restart(
        tmp_path: Path) -> None:
    """A reload's revocation pass commits what stops each token (state, closure, `revoked`
    audit row, the announcements) with follow-up rows in the outbox for the rest (DM and
    card edits, the reviews: `reconcile.follow_up`), which serve runs right after the
    pass. It is SIGKILLed once the first follow-up has run, with others still pending;
    after the restart every grant gets its review and its announcement, each once."""
    n = 1000
    async with Serve(tmp_path) as serve:
        await serve.start()
        ids = seed_live_grants(serve.db_path, n)
        serve.policy_path.write_text(serve.policy_text.replace(
            'permissions = ["payments:read", "payments:write"]', 'permissions = ["payments:read"]'))
        serve.sighup()
        jobs = "SELECT count(*) FROM outbox WHERE kind = 'revoked_batch' AND status = ?"
        deadline = time.monotonic() + 60
        while serve.sql(jobs, "sent")[0][0] == 0:  # the first follow-up has run: kill
            assert time.monotonic() < deadline, f"no follow-up ran; log:\n{serve.log()[-3000:]}"
            await asyncio.sleep(0.005)
        assert serve.proc is not None
        serve.proc.kill()
        serve.proc.wait()
        assert serve.sql(jobs, "pending")[0][0] > 0, "every follow-up ran before the kill"
        assert serve.sql("SELECT count(*) FROM requests WHERE id LIKE 'RS%' "
                         "AND state = 'revoked'")[0][0] == n
        assert len(serve.sql("SELECT * FROM audit_log WHERE event = 'revoked'")) == n

        await serve.start()  # the same database: the follow-ups left are run now
        await serve.until(lambda: serve.sql(
            "SELECT count(*) FROM outbox WHERE kind = 'revoked_batch' AND status != 'sent'"
        )[0][0] == 0, 60, "follow-ups not finished after the restart")
        await serve.until(lambda: serve.sql("SELECT count(*) FROM reviews")[0][0] == n, 30,
                          "not every grant got its review")
        opened = serve.sql("SELECT request_id, count(*) FROM audit_log "
                           "WHERE event = 'review_opened' GROUP BY request_id")
        assert {rid for rid, _ in opened} == set(ids) and {c for _, c in opened} == {1}
        revoked = serve.sql("SELECT request_id, count(*) FROM audit_log "
                            "WHERE event = 'revoked' GROUP BY request_id")
        assert {rid for rid, _ in revoked} == set(ids) and {c for _, c in revoked} == {1}

        def announced() -> Counter[str]:
            return Counter(rid for text in serve.incident() if "*revoked*" in text
                           for rid in re.findall(r"RS\d{6}", text))
        await serve.until(lambda: len(announced()) == n, 60, "not every revocation announced")
        assert set(announced().values()) == {1}
        await serve.stop()
