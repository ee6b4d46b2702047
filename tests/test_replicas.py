"""Several `breakglass serve` replicas on one database (contract §8), on SQLite and
PostgreSQL: a revocation made through one replica holds in the other within 100 ms
and never flips back; a token's expiry is swept and announced once; a replica killed
with SIGKILL mid-delivery leaves its work to the other; a policy file edit and `keys
rotate` reach both within 10 s; two replay guards recording the same signatures at once
agree on who saw each first."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import ServeProcess, base_env, query

from bot.core.clock import SystemClock
from bot.core.kdf import new_master_key
from bot.local.emulator import SlackEmulator, SlackSender
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, PEOPLE, REVIEWS, ProbeTarget, sandbox_policy
from bot.store.db import Database
from bot.store.replay import ReplayGuard

CLIENT_SECRET = "replica-" + os.urandom(6).hex()


@dataclass
class Replicas:
    emu: SlackEmulator
    a: ServeProcess
    b: ServeProcess
    to_a: SlackSender
    to_b: SlackSender
    url: str
    token: str


@pytest.fixture
async def replicas(tmp_path: Path, empty_database_url: str) -> AsyncIterator[Replicas]:
    bot_token, secret = "xoxb-" + os.urandom(8).hex(), os.urandom(16).hex()
    emu = SlackEmulator(bot_token=bot_token)
    probes = ProbeTarget()
    await emu.start()
    await probes.start()
    for user, name in PEOPLE.items():
        emu.set_user(user, name=name.split()[0])
    env = base_env(tmp_path, emu, sandbox_policy(probes.url, CLIENT_SECRET, delivery="message"),
                   bot_token, secret, new_master_key(), empty_database_url)
    a, b = ServeProcess(env, tmp_path / "a.log"), ServeProcess(env, tmp_path / "b.log")
    try:
        await asyncio.gather(a.start(), b.start())  # at once, on an empty database
        yield Replicas(emu, a, b, SlackSender(a.url + "/slack/events", secret, emu),
                       SlackSender(b.url + "/slack/events", secret, emu), empty_database_url, bot_token)
        for log in (a.log_path, b.log_path):
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        await a.stop()
        await b.stop()
        await probes.stop()
        await emu.stop()


async def _token_via(r: Replicas, ttl: str = "20m") -> str:
    """Alice asks at A, bob approves at A and carol at B; the DM carries the token."""
    await r.to_a.command(ALICE, f"payments-write {ttl} INC-42 replicas")
    await r.emu.wait_for(lambda: len(r.emu.messages(REVIEWS)) == 1, timeout=15)
    rid = re.search(r"request (R\w{7})", r.emu.messages(REVIEWS)[0].text or "").group(1)  # type: ignore[union-attr]
    await r.to_a.click(BOB, "bg_approve", rid, channel_id=REVIEWS)
    await r.to_b.click(CAROL, "bg_approve", rid, channel_id=REVIEWS)
    await r.emu.wait_for(lambda: any(re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", m.text or "")
                                     for m in r.emu.messages(ALICE)), timeout=15)
    for m in r.emu.messages(ALICE):
        found = re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", m.text or "")
        if found:
            return found.group(0)
    raise AssertionError("no token")


def _basic() -> dict[str, str]:
    creds = base64.b64encode(f"payments-api:{CLIENT_SECRET}".encode()).decode()
    return {"Authorization": f"Basic {creds}"}


async def _active(session: aiohttp.ClientSession, replica: ServeProcess, token: str) -> bool:
    async with session.post(replica.url + "/oauth2/introspect", data={"token": token},
                            headers=_basic()) as resp:
        assert resp.status == 200, await resp.text()
        return bool((await resp.json())["active"])


async def test_a_revocation_holds_in_every_replica_within_100ms(replicas: Replicas) -> None:
    r = replicas
    token = await _token_via(r)
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # both replicas know the token, and have it in their caches
            assert await _active(session, r.a, token) and await _active(session, r.b, token)
        async with session.post(r.a.url + "/oauth2/revoke", data={"token": token},
                                headers=_basic()) as resp:
            assert resp.status == 200
        revoked_at = time.monotonic()
        answers: list[tuple[float, bool]] = []
        while time.monotonic() - revoked_at < 1.0:
            answers.append((time.monotonic() - revoked_at, await _active(session, r.b, token)))
        first_inactive = next(t for t, active in answers if not active)
        assert first_inactive <= 0.1, f"replica B said active for {first_inactive * 1000:.0f} ms"
        assert not any(active for t, active in answers if t >= first_inactive), "active again"
        assert not await _active(session, r.a, token)
    await r.emu.wait_for(lambda: sum("revoked" in (m.text or "").lower()
                                     for m in r.emu.messages(INCIDENT)) >= 1, timeout=10)
    await asyncio.sleep(1.0)
    assert sum("revoked" in (m.text or "").lower() for m in r.emu.messages(INCIDENT)) == 1


async def test_an_expiry_is_swept_and_announced_once(replicas: Replicas) -> None:
    r = replicas
    token = await _token_via(r, ttl="2s")  # clamped to the minimum the policy allows, if any
    [(exp,)] = await query(r.url, "SELECT token_expires_at FROM requests")
    assert exp is not None
    await r.emu.wait_for(lambda: any("expired" in (m.text or "").lower()
                                     for m in r.emu.messages(INCIDENT)), timeout=30)
    await asyncio.sleep(2.0)  # both replicas swept several times by now
    expired_posts = [m for m in r.emu.messages(INCIDENT) if "expired" in (m.text or "").lower()]
    assert len(expired_posts) == 1
    rows = await query(r.url, "SELECT count(*) FROM audit_log WHERE event = 'expired'")
    assert rows == [(1,)]
    async with aiohttp.ClientSession() as session:
        assert not await _active(session, r.a, token) and not await _active(session, r.b, token)


async def test_a_replica_killed_mid_delivery_leaves_its_work_to_the_other(replicas: Replicas) -> None:
    """A's outbox has leased the approval card and is waiting on Slack when A is killed:
    B delivers the card once the lease runs out, and the flow finishes through B."""
    r = replicas
    r.emu.hang("chat.postMessage", 60, times=2)  # the card and the incident post, in A's lease
    await r.to_a.command(ALICE, "payments-write 20m INC-43 the first replica dies")
    await r.emu.wait_for(lambda: any(c.fault == "hang" for c in r.emu.calls_to("chat.postMessage")),
                         timeout=15)
    assert r.a.proc is not None
    r.a.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(r.a.proc.wait, 10)
    # B takes over when A's lease (30 s) has run out.
    await r.emu.wait_for(lambda: len(r.emu.messages(REVIEWS)) >= 1, timeout=45)
    rid = re.search(r"request (R\w{7})", r.emu.messages(REVIEWS)[0].text or "").group(1)  # type: ignore[union-attr]
    await r.to_b.click(BOB, "bg_approve", rid, channel_id=REVIEWS)
    await r.to_b.click(CAROL, "bg_approve", rid, channel_id=REVIEWS)
    await r.emu.wait_for(lambda: any("eyJ" in (m.text or "") for m in r.emu.messages(ALICE)),
                         timeout=15)
    [(state,)] = await query(r.url, "SELECT state FROM requests WHERE id = :r", r=rid)
    assert state == "revealed"


async def test_a_policy_edit_and_a_key_rotation_reach_both_replicas_within_10s(
        replicas: Replicas) -> None:
    """operations.md, Running replicas: "a policy file change and a `keys rotate` reach
    every replica within 10 s (each watches by itself)": the file edited on disk, no
    signal; each replica's /healthz names the new policy's SHA-256, and after `keys
    rotate` each one's JWKS leads with the new key."""
    import hashlib
    import subprocess
    import sys

    r = replicas
    path = Path(r.a.env["BREAKGLASS_POLICY"])
    text = path.read_text() + "\n# reviewed by the replicas test\n"
    want = hashlib.sha256(text.encode()).hexdigest()

    async def get(replica: ServeProcess, what: str) -> Any:
        async with aiohttp.ClientSession() as session:
            async with session.get(replica.url + what) as resp:
                return await resp.json()

    async def within(check: Any, seconds: float, what: str) -> float:
        started = time.monotonic()
        while not await check():
            assert time.monotonic() - started < seconds, what
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    path.write_text(text)

    async def both_reloaded() -> bool:
        return all([(await get(x, "/healthz"))["policy_sha256"] == want for x in (r.a, r.b)])

    await within(both_reloaded, 10.5, "a replica still runs the old policy after 10 s")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bot", "keys", "rotate"], env=r.a.env,
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    kid = re.search(r"new signing key (bg-[a-z2-7]{12})", done.stdout)
    assert kid is not None, done.stdout

    async def both_rotated() -> bool:
        return all([(await get(x, "/.well-known/jwks.json"))["keys"][0]["kid"] == kid.group(1)
                    for x in (r.a, r.b)])

    await within(both_rotated, 10.5, "a replica still signs with the old key after 10 s")


async def test_replay_guards_of_two_processes_agree(database_url: str) -> None:
    """The group commit's INSERT … ON CONFLICT DO NOTHING under concurrent inserts: each
    signature is 'first' for exactly one of two guards (two processes' worth)."""
    dbs = [Database(database_url), Database(database_url)]
    try:
        await dbs[0].create_schema()
        guards = [ReplayGuard(db, SystemClock()) for db in dbs]
        signatures = [f"v0={os.urandom(32).hex()}" for _ in range(200)]

        async def record(guard: ReplayGuard, sig: str) -> bool:
            return await guard.first_time(sig)

        results: list[Any] = await asyncio.gather(*(record(g, s) for s in signatures for g in guards))
        firsts = [results[i] + results[i + 1] for i in range(0, len(results), 2)]
        assert firsts == [1] * len(signatures)
    finally:
        for db in dbs:
            await db.dispose()
