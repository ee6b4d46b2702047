"""Exactly once: a storm of Approve clicks, two bot processes on one database,
Slack retries and byte-identical replays never issue twice or act twice."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from helpers import ServeProcess, base_env, query
from sqlalchemy import func, select

from bot import audit
from bot.core.kdf import new_master_key
from bot.local.emulator import SentRequest, SlackEmulator, SlackSender
from bot.local.sandbox import (
    ALICE,
    BOB,
    CAROL,
    INCIDENT,
    PEOPLE,
    REVIEWS,
    ProbeTarget,
    Sandbox,
    sandbox_policy,
)
from bot.store.schema import decisions, requests

CROWD = [f"U0CROWD{i:02d}" for i in range(50)]
JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")


def crowd_policy(quorum: int) -> str:
    """A group of 50 approvers and a scope they approve (added beside the sandbox's own)."""
    members = ", ".join(f'"{u}"' for u in CROWD)
    return f"""
[groups.crowd]
members = [{members}]

[scopes.crowd-write]
description = "Write access, approved by a crowd"
audience = "payments-api"
permissions = ["payments:read", "payments:write"]
requesters = ["oncall"]
approvers = ["crowd"]
quorum = {quorum}
max_ttl = "30m"
triggers = ["primary-auth-down"]
"""


class RecordingSender(SlackSender):
    """A SlackSender that keeps the exact bytes and headers of what it sent."""

    sent: list[tuple[bytes, dict[str, str]]]

    async def raw(self, body: bytes, headers: Mapping[str, str]) -> SentRequest:
        if not hasattr(self, "sent"):
            self.sent = []
        self.sent.append((body, dict(headers)))
        return await super().raw(body, headers)


@pytest.fixture
async def crowd_box(tmp_path: Path, database_url: str,
                    request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    box = Sandbox(directory=tmp_path, database_url=database_url, extra_policy=crowd_policy(request.param))
    await box.start()
    try:
        yield box
    finally:
        await box.stop()


def issued_posts(emu: SlackEmulator) -> list[str]:
    return [m.text for m in emu.messages(INCIDENT) if "*issued*" in m.text]


async def audit_rows(box: Sandbox) -> list[dict[str, Any]]:
    return [row async for row in audit.export(box.bot.db)]


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("crowd_box", [5, 50], indirect=True, ids=["quorum5", "quorum50"])
async def test_fifty_concurrent_approvals_issue_one_token(crowd_box: Sandbox) -> None:
    box, emu = crowd_box, crowd_box.emulator
    quorum = box.bot.policy.scopes["crowd-write"].quorum
    resp = await box.slack.command(ALICE, "crowd-write 20m INC-50 everyone at once")
    assert resp.status == 200
    await box.settle()
    rid = box.latest_request_id()

    answers = await asyncio.gather(*(
        box.slack.click(u, "bg_approve", rid, channel_id=REVIEWS) for u in CROWD))
    assert all(a.status == 200 for a in answers)
    await box.settle(15)

    req = await box.bot.service.request(rid)
    assert req is not None and req.state.value == "issued" and req.jti
    assert len(req.approvals) == quorum
    rows = await audit_rows(box)
    mine = [r for r in rows if r["request_id"] == rid]
    assert [r["event"] for r in mine].count("issued") == 1
    assert [r["event"] for r in mine].count("approved") == quorum
    [issued] = [r for r in mine if r["event"] == "issued"]
    assert issued["details"]["jti"] == req.jti
    refused = [r for r in mine if r["event"] == "refused"]
    assert len(refused) == 50 - quorum
    assert {r["details"]["code"] for r in refused} <= {"request_closed"}
    # Every click that did not count was told so, privately; none was told twice.
    assert len(emu.responses) == 50 - quorum + 1  # + the command's own reply

    assert len(emu.messages(ALICE)) == 1, "exactly one DM"
    assert len(issued_posts(emu)) == 1, "exactly one 'issued' in the incident channel"
    assert len(emu.messages(REVIEWS)) == 1 and "Approved by" in box.card(rid).text + str(
        box.card(rid).blocks)
    async with box.bot.db.read() as conn:
        assert await conn.scalar(select(func.count()).select_from(decisions)
                                 .where(decisions.c.request_id == rid)) == quorum
        assert await conn.scalar(select(func.count()).select_from(requests)
                                 .where(requests.c.jti.is_not(None))) == 1

    # The one token carries that one jti.
    dm = emu.messages(ALICE)[0]
    await box.slack.click(ALICE, "bg_reveal", rid, channel_id=emu.dm_channel_for(ALICE),
                          message_ts=dm.ts)
    await box.settle()
    [view] = emu.views
    token = JWT_RE.search(str(view.view)).group(0)  # type: ignore[union-attr]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["jti"] == req.jti and sorted(claims["breakglass"]["approvers"]) == sorted(
        req.approvals)


# --------------------------------------------------------------------------- replays


async def test_slack_retries_and_byte_identical_replays_never_act_twice(tmp_path: Path,
                                                                      database_url: str) -> None:
    box = Sandbox(directory=tmp_path, database_url=database_url)
    await box.start()
    try:
        emu = box.emulator
        sender = RecordingSender(box.slack.app_url, box.signing_secret, emu)
        box.slack = sender

        # A command creates a request; its replay does not create another.
        await sender.command(ALICE, "payments-write 30m INC-8 replayed command")
        await box.settle()
        body, headers = sender.sent[-1]
        before = (await box.bot.service.count_requests(), len(await audit_rows(box)),
                  len(emu.calls), len(emu.responses))
        again = await sender.raw(body, headers)
        assert again.status == 200
        retried = await sender.raw(body, {**sender.sign(body), **_form(),
                                          "X-Slack-Retry-Num": "1",
                                          "X-Slack-Retry-Reason": "http_timeout"})
        assert retried.status == 200 and retried.headers.get("X-Slack-No-Retry") == "1"
        await box.settle()
        after = (await box.bot.service.count_requests(), len(await audit_rows(box)),
                 len(emu.calls), len(emu.responses))
        assert after == before
        rid = box.latest_request_id()

        # A click: replay and retry change nothing (not even a "you already approved").
        await sender.click(BOB, "bg_approve", rid, channel_id=REVIEWS)
        await box.settle()
        body, headers = sender.sent[-1]
        before = (len(await audit_rows(box)), len(emu.calls), len(emu.responses))
        for _ in range(3):
            assert (await sender.raw(body, headers)).status == 200
        assert (await sender.raw(body, {**headers, "X-Slack-Retry-Num": "2"})).status == 200
        await box.settle()
        assert (len(await audit_rows(box)), len(emu.calls), len(emu.responses)) == before

        # Concurrent replays of the quorum click: one issue, whatever wins the race.
        await sender.click(CAROL, "bg_approve", rid, channel_id=REVIEWS)
        body, headers = sender.sent[-1]
        await asyncio.gather(*(sender.raw(body, headers) for _ in range(10)))
        await box.settle()
        events = [r["event"] for r in await audit_rows(box) if r["request_id"] == rid]
        assert events.count("issued") == 1 and events.count("approved") == 2
        assert "refused" not in events
        assert len(emu.messages(ALICE)) == 1 and len(issued_posts(emu)) == 1

        # A replayed body with a forged fresh timestamp fails the signature: 401, nothing done.
        forged = {**headers, "X-Slack-Request-Timestamp": str(int(time.time()) + 1)}
        assert (await sender.raw(body, forged)).status == 401
    finally:
        await box.stop()


def _form() -> dict[str, str]:
    return {"Content-Type": "application/x-www-form-urlencoded"}


# --------------------------------------------------------------------------- two processes


async def test_two_serve_processes_on_one_database_issue_once(tmp_path: Path,
                                                             empty_database_url: str) -> None:
    token, secret, master = "xoxb-" + os.urandom(8).hex(), os.urandom(16).hex(), new_master_key()
    emu = SlackEmulator(bot_token=token)
    probes = ProbeTarget()
    await emu.start()
    await probes.start()
    for user, name in PEOPLE.items():
        emu.set_user(user, name=name.split()[0])
    env = base_env(tmp_path, emu, sandbox_policy(probes.url, "s3cret", extra=crowd_policy(7)),
                   token, secret, master, empty_database_url)
    a = ServeProcess(env, tmp_path / "a.log")
    b = ServeProcess(env, tmp_path / "b.log")
    try:
        await asyncio.gather(a.start(), b.start())  # both create the schema at once, too
        to_a = RecordingSender(a.url + "/slack/events", secret, emu)
        to_b = RecordingSender(b.url + "/slack/events", secret, emu)
        await to_a.command(ALICE, "crowd-write 20m INC-2 two processes")
        await emu.wait_for(lambda: len(emu.messages(REVIEWS)) == 1, timeout=10)
        rid = re.search(r"request (R\w{7})", emu.messages(REVIEWS)[0].text).group(1)  # type: ignore[union-attr]

        clicks = [(to_a if i % 2 == 0 else to_b).click(u, "bg_approve", rid, channel_id=REVIEWS)
                  for i, u in enumerate(CROWD)]
        answers = await asyncio.gather(*clicks)
        assert all(x.status == 200 for x in answers)
        # A click sent to A replayed at B (same bytes): the shared replay guard refuses it.
        body, headers = to_a.sent[-1]
        assert (await to_b.raw(body, headers)).status == 200

        await emu.wait_for(lambda: len(emu.messages(ALICE)) >= 1 and len(issued_posts(emu)) >= 1
                           and len(emu.responses) >= 1 + 50 - 7, timeout=20)
        await asyncio.sleep(1.0)  # anything doubled would show up by now
        assert len(emu.messages(ALICE)) == 1
        assert len(issued_posts(emu)) == 1
        assert len(emu.messages(REVIEWS)) == 1
        assert len(emu.responses) == 1 + 50 - 7

        assert await a.stop() == 0 and await b.stop() == 0
        url = empty_database_url
        events = [e for (e,) in await query(
            url, "SELECT event FROM audit_log WHERE request_id = :r ORDER BY seq", r=rid)]
        jtis = await query(url, "SELECT jti FROM requests WHERE jti IS NOT NULL")
        [(n_decisions,)] = await query(url, "SELECT count(*) FROM decisions")
        [(pending,)] = await query(url, "SELECT count(*) FROM outbox WHERE status != 'sent'")
        assert events.count("issued") == 1 and events.count("approved") == 7
        assert events.count("refused") == 50 - 7
        assert len(jtis) == 1 and n_decisions == 7 and pending == 0
        for log in (a.log_path, b.log_path):
            text = log.read_text()
            assert "Traceback" not in text and token not in text and not JWT_RE.search(text)
        await to_a.close()
        await to_b.close()
    finally:
        await a.stop()
        await b.stop()
        await probes.stop()
        await emu.stop()


async def test_audit_chain_holds_after_two_processes_wrote_it(tmp_path: Path,
                                                              empty_database_url: str) -> None:
    """Two processes appending at once keep one gapless chain (BEGIN IMMEDIATE + triggers)."""
    token, secret, master = "xoxb-" + os.urandom(8).hex(), os.urandom(16).hex(), new_master_key()
    emu = SlackEmulator(bot_token=token)
    probes = ProbeTarget()
    await emu.start()
    await probes.start()
    # Every refusal audited one by one (past the flood threshold they are summarised):
    # 40 appends racing from two processes.
    policy = sandbox_policy(probes.url, "s3cret", extra="\n[alerts]\nrefusals_per_hour = 100\n")
    env = base_env(tmp_path, emu, policy, token, secret, master, empty_database_url)
    a = ServeProcess(env, tmp_path / "a.log")
    b = ServeProcess(env, tmp_path / "b.log")
    try:
        await asyncio.gather(a.start(), b.start())
        senders = [SlackSender(p.url + "/slack/events", secret, emu) for p in (a, b)]
        # Refusals are audited: 40 of them, from both processes at once.
        await asyncio.gather(*(senders[i % 2].command("U0MALLORY", "payments-write 5m INC-1 x")
                               for i in range(40)))
        await emu.wait_for(lambda: len(emu.responses) >= 40, timeout=20)
        for s in senders:
            await s.close()
        assert await a.stop() == 0 and await b.stop() == 0
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bot", "audit", "verify"], env=env,
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        seqs = [s for (s,) in await query(empty_database_url, "SELECT seq FROM audit_log ORDER BY seq")]
        [(refused,)] = await query(empty_database_url,
                                   "SELECT count(*) FROM audit_log WHERE event = 'refused'")
        assert seqs == list(range(1, len(seqs) + 1)) and refused == 40
    finally:
        await a.stop()
        await b.stop()
        await probes.stop()
        await emu.stop()
