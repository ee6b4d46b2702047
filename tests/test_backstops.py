"""Each defence that has a backstop, tested alone with the backstop out of the way, so
that a bug in either one fails a test (with both in place, either hides the other's).

- Replays of a signed Slack request: the in-memory check on the ack path (its answer to
  the replay: an empty 200, not a second acknowledgement), then the database's record
  of signatures, each with the other switched off.
- Each approver counts once: the UNIQUE (request, user) on `decisions`, with the
  in-Python check (`quorum.judge_click`) switched off.
- The state guards of the conditional updates (`WHERE state IN (...)`): an Approve that
  reaches quorum on a request already denied, an expiry of a token already revoked, and
  an escalation of a request already closed, each with the check that would normally
  stop it first (judge_click, the sweeper's query) out of the way.

Everything runs through the real bot over signed HTTP (the Slack emulator), on SQLite
and PostgreSQL (the `sandbox` fixture).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from bot.core import quorum
from bot.core.domain import State
from bot.local.emulator import SentRequest, command_fields
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, REVIEWS, Sandbox
from bot.store import requests as store
from bot.store.schema import audit_log, decisions, requests


async def signed_command(box: Sandbox, user: str, text: str) -> tuple[bytes, dict[str, str], str]:
    fields = command_fields(box.emulator, user, text)
    body = urlencode(fields).encode()
    headers = {**box.slack.sign(body), "Content-Type": "application/x-www-form-urlencoded"}
    return body, headers, fields["response_url"]


async def count(box: Sandbox, table: Any, *where: Any) -> int:
    async with box.bot.db.read() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)


async def events(box: Sandbox, rid: str) -> list[tuple[str, str]]:
    async with box.bot.db.read() as conn:
        rows = await conn.execute(select(audit_log.c.event, audit_log.c.actor)
                                  .where(audit_log.c.request_id == rid).order_by(audit_log.c.seq))
        return [(r.event, r.actor) for r in rows]


def replies(box: Sandbox, response_url: str) -> list[str]:
    return [str(r.body.get("text", "")) for r in box.emulator.responses if r.url == response_url]


# --------------------------------------------------------------------------- replays


async def test_the_in_memory_replay_check_alone(sandbox: Sandbox,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async def every_signature_is_new(signature: str) -> bool:
        return True  # the database's record of signatures, out of the way

    monkeypatch.setattr(sandbox.bot.replay_guard, "first_time", every_signature_is_new)
    body, headers, response_url = await signed_command(
        sandbox, ALICE, "payments-write 30m INC-31 replayed on purpose")
    first: SentRequest = await sandbox.slack.raw(body, headers)
    replay: SentRequest = await sandbox.slack.raw(body, headers)
    await sandbox.settle()
    assert first.status == 200 and first.json is not None
    assert first.json["text"].startswith("Checking `payments-write`")
    # The replay's answer: an empty 200, acknowledging nothing and starting nothing.
    assert (replay.status, replay.body, replay.json) == (200, "", None)
    assert await count(sandbox, requests) == 1
    assert len([m for m in sandbox.emulator.messages(REVIEWS) if "INC-31" in json.dumps(
        m.blocks)]) == 1
    assert len(replies(sandbox, response_url)) == 1  # one "request … is waiting" reply


async def test_the_database_replay_record_alone(sandbox: Sandbox,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.bot.replay_guard, "first_time_here",
                        lambda *args, **kwargs: True)  # the in-memory check, out of the way
    body, headers, response_url = await signed_command(
        sandbox, ALICE, "payments-write 30m INC-32 replayed on purpose")
    first = await sandbox.slack.raw(body, headers)
    await sandbox.settle()
    replay = await sandbox.slack.raw(body, headers)
    await sandbox.settle()
    assert first.status == replay.status == 200
    assert await count(sandbox, requests) == 1  # acted on once
    assert len(replies(sandbox, response_url)) == 1


# --------------------------------------------------------------------------- decisions


def judge_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch off the in-Python checks of a click (state, requester, counted already)."""
    monkeypatch.setattr(quorum, "judge_click", lambda *args, **kwargs: None)


async def click(box: Sandbox, user: str, action: str, rid: str) -> SentRequest:
    resp = await box.slack.click(user, action, rid, channel_id=REVIEWS)
    await box.settle()
    return resp


async def test_the_unique_decision_alone(sandbox: Sandbox,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    await sandbox.slack.command(ALICE, "payments-write 30m INC-33 double click")
    await sandbox.settle()
    rid = sandbox.latest_request_id()
    await click(sandbox, BOB, "bg_approve", rid)
    judge_nothing(monkeypatch)
    await click(sandbox, BOB, "bg_approve", rid)  # the same person again: quorum is 2
    assert await count(sandbox, decisions, decisions.c.request_id == rid) == 1
    async with sandbox.bot.db.read() as conn:
        req = await store.load(conn, rid)
    assert req is not None and req.state is State.PENDING and req.jti is None
    assert [e for e in await events(sandbox, rid) if e[0] in ("approved", "issued")] == [
        ("approved", BOB)]


async def test_the_unique_decision_in_the_schema(sandbox: Sandbox) -> None:
    await sandbox.slack.command(ALICE, "payments-write 30m INC-34 schema")
    await sandbox.settle()
    rid = sandbox.latest_request_id()
    now = sandbox.bot.clock.now()
    with pytest.raises(IntegrityError):
        async with sandbox.bot.db.transaction() as conn:
            await store.add_decision(conn, rid, CAROL, "approve", now)
            await store.add_decision(conn, rid, CAROL, "deny", now)
    assert await count(sandbox, decisions, decisions.c.request_id == rid) == 0


# --------------------------------------------------------------------------- state guards


async def test_the_state_guard_of_issuing_alone(sandbox: Sandbox,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    await sandbox.slack.command(ALICE, "payments-write 30m INC-35 denied first")
    await sandbox.settle()
    rid = sandbox.latest_request_id()
    await click(sandbox, CAROL, "bg_approve", rid)
    await click(sandbox, DAVE, "bg_deny", rid)
    judge_nothing(monkeypatch)
    resp = await click(sandbox, BOB, "bg_approve", rid)  # the second approval of quorum 2
    async with sandbox.bot.db.read() as conn:
        req = await store.load(conn, rid)
    assert req is not None and req.state is State.DENIED and req.jti is None
    assert await count(sandbox, decisions, decisions.c.request_id == rid) == 2  # rolled back
    assert "issued" not in [e for e, _ in await events(sandbox, rid)]
    said = replies(sandbox, resp.response_url or "")
    assert said and f"Request {rid} is already closed" in said[-1], said


async def test_the_state_guard_of_expiry_alone(sandbox: Sandbox) -> None:
    await sandbox.slack.command(ALICE, "payments-write 30m INC-36 revoked first")
    await sandbox.settle()
    rid = sandbox.latest_request_id()
    for approver in (BOB, CAROL):
        await click(sandbox, approver, "bg_approve", rid)
    service = sandbox.bot.service
    async with sandbox.bot.db.read() as conn:
        stale = await store.load(conn, rid)  # what a sweeper read before the revocation
    assert stale is not None and stale.state is State.ISSUED
    await service.revoke(rid, BOB)
    # The sweeper's query would not pick it any more: hand it the stale copy directly.
    assert stale.token_expires_at is not None
    assert await service._expire(stale, stale.token_expires_at) == 0  # noqa: SLF001
    async with sandbox.bot.db.read() as conn:
        after = await store.load(conn, rid)
    assert after is not None and after.state is State.REVOKED
    assert [e for e, _ in await events(sandbox, rid)].count("expired") == 0


async def test_the_state_guard_of_escalation_alone(sandbox: Sandbox) -> None:
    await sandbox.slack.command(ALICE, "payments-write 30m INC-37 cancelled first")
    await sandbox.settle()
    rid = sandbox.latest_request_id()
    await sandbox.slack.command(ALICE, f"revoke {rid}")
    await sandbox.settle()
    now = sandbox.bot.clock.now()
    async with sandbox.bot.db.transaction() as conn:
        assert await store.mark_escalated(conn, rid, now) is False
        assert await store.transition(conn, rid, [State.PENDING], State.ISSUED) is False
    async with sandbox.bot.db.read() as conn:
        row = (await conn.execute(select(requests.c.state, requests.c.escalated_at)
                                  .where(requests.c.id == rid))).one()
    assert (row.state, row.escalated_at) == (State.CANCELLED.value, None)
