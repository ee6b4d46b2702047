"""Drills (contract 7.4), through the emulator over HTTP: `/breakglass drill SCOPE`, DRILL on
every message, a token no relying service accepts, the times at reveal, the histogram on
/metrics, the rate limit, `breakglass drills` and the daily reminder."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from test_flow import (
    ISSUER,
    MakeBox,
    all_versions,
    approve,
    command,
    content,
    events,
    incident,
    public_key,
    replies,
    reveal,
    row,
    seen,
    wait_state,
)
from test_relying_services import basic, introspect, post

from bot import audit
from bot.core.clock import ManualClock, OffsetClock
from bot.governance import drills
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, REVIEWS, Sandbox
from bot.store import requests as store

ROOT = Path(__file__).resolve().parent.parent
DRILL_SECRET = "drill-client-secret-for-tests"
# A relying service that lists the drill audience: its drill tokens are still inactive.
DRILL_CLIENT = (
    "[clients.drill-rehearsal]\n"
    f'secret_sha256 = "{hashlib.sha256(DRILL_SECRET.encode()).hexdigest()}"\n'
    'audiences = ["payments-api", "breakglass-drill"]\n'
)




async def metrics_text(box: Sandbox) -> str:
    async with aiohttp.ClientSession() as s, s.get(box.metrics_url) as r:
        assert r.status == 200
        return await r.text()


def histogram_count(text: str, kind: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'breakglass_time_to_access_seconds_count{{kind="{kind}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no time-to-access count for kind={kind} in /metrics")


def about(box: Sandbox, rid: str, channel: str) -> list[str]:
    """Every version of every message in `channel` that is about `rid`."""
    return [v for m in box.emulator.messages(channel) for v in all_versions(m)
            if rid in content(m) or any(rid in x for x in all_versions(m))]


async def test_drill_end_to_end(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, extra_policy=DRILL_CLIENT)
    box.probes.status["auth"] = 200  # the auth provider is fine: a real request is refused
    before = histogram_count(await metrics_text(box), "drill")

    resp = await command(box, ALICE, "drill payments-write INC-7 quarterly rehearsal")
    assert "DRILL" in resp.json["text"]
    rid = box.latest_request_id()
    reply = "\n".join(replies(box, resp))
    assert "DRILL" in reply and rid in reply and "primary-auth-down" in reply  # not holding
    stored = await row(box, rid)
    assert stored.drill and stored.state == "pending" and stored.incident == "INC-7"
    assert stored.command_at is not None

    card = box.card(rid)
    assert card.blocks[0]["text"]["text"].startswith("DRILL")
    assert card.text.startswith("DRILL") and "HTTP 200" in content(card)  # probed and shown

    clock.advance(timedelta(minutes=2))  # the approvers take their time
    await approve(box, rid, BOB, CAROL)
    assert (await row(box, rid)).state == "issued"
    token = await reveal(box, rid)

    header = jwt.get_unverified_header(token)
    key = await public_key(box, header["kid"])
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience="breakglass-drill",
                        issuer=ISSUER, leeway=timedelta(minutes=3))  # the clock moved 2m
    assert claims["aud"] == "breakglass-drill"
    assert claims["breakglass"]["drill"] is True and claims["breakglass"]["request_id"] == rid
    assert claims["scope"] == "payments:read payments:write"  # real, but for no service

    # Introspection: inactive for every client, even one whose audiences name the drill.
    for client, secret in (("payments-api", None), ("drill-rehearsal", DRILL_SECRET)):
        status, _, answer = await introspect(box, token, client, secret)
        assert (status, answer) == (200, {"active": False}), client
    assert box.bot.introspector.rejections["drill token (accepted by no service)"] == 2
    assert "used" not in await events(box, rid)

    # The times, posted when the token was revealed.
    times = [t for t in incident(box, "drill times", rid)]
    assert len(times) == 1, box.emulator.messages(INCIDENT)
    assert times[0].startswith("DRILL") and "command → card" in times[0]
    assert "→ quorum 2m" in times[0] and "→ reveal 2m" in times[0]
    assert "drill" in await events(box, rid)
    async with box.bot.db.read() as conn:  # "card" is when the card reached Slack
        opened = (await row(box, rid)).created_at
        posted = await drills.card_posted_at(conn, await store.load(conn, rid))
    assert posted.replace(tzinfo=None) > opened.replace(tzinfo=None)
    assert histogram_count(await metrics_text(box), "drill") == before + 1

    # RFC 7009 revocation still works for a client of the drill audience.
    status, _, _ = await post(f"{box.url}/oauth2/revoke", {"token": token},
                              basic("drill-rehearsal", DRILL_SECRET))
    assert status == 200
    await box.settle()
    assert (await row(box, rid)).state == "revoked"

    # DRILL on the card, every DM and every incident post, in every version.
    for version in about(box, rid, REVIEWS) + about(box, rid, ALICE):
        assert "DRILL" in version, version
    posts = [m.text for m in box.emulator.messages(INCIDENT) if rid in m.text]
    assert {p.split("*")[1] for p in posts} >= {"requested", "issued", "drill times", "revoked"}
    assert all(p.startswith("DRILL") for p in posts), posts

    # Every audited event about it says drill (what webhooks send): receivers can leave it out.
    rows = [r async for r in audit.export(box.bot.db) if r["request_id"] == rid]
    assert {r["event"] for r in rows} >= {"requested", "approved", "issued", "revealed",
                                          "drill", "revoked"}
    for r in rows:
        details = r["details"] if isinstance(r["details"], dict) else json.loads(r["details"])
        assert details.get("drill") is True, r


async def test_a_real_request_is_measured_too(make_box: MakeBox) -> None:
    box = await make_box()
    before = histogram_count(await metrics_text(box), "real")
    await command(box, ALICE, "payments-write 30m INC-1 auth down")
    rid = box.latest_request_id()
    await approve(box, rid, BOB, CAROL)
    await reveal(box, rid)
    assert histogram_count(await metrics_text(box), "real") == before + 1
    assert incident(box, "drill times") == []  # only drills post their times
    assert all("DRILL" not in v for v in about(box, rid, INCIDENT) + about(box, rid, ALICE))


async def test_message_delivery_times_a_drill_once(make_box: MakeBox) -> None:
    box = await make_box(delivery="message")
    await command(box, ALICE, "drill db-admin")
    rid = box.latest_request_id()
    await approve(box, rid, BOB)
    dm_text = next(m.text for m in box.emulator.messages(ALICE) if rid in m.text)
    assert dm_text.startswith("DRILL")
    token = dm_text.rsplit("\n", 1)[-1]
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "breakglass-drill"
    assert len(incident(box, "drill times", rid)) == 1
    assert (await row(box, rid)).reason == "drill"  # no reason given: "drill"


async def test_drills_do_not_count_for_the_rate_limit(make_box: MakeBox) -> None:
    box = await make_box(rate_limit=1)
    for _ in range(2):
        resp = await command(box, ALICE, "drill payments-write")
    assert "1 drills in the last 10m" in seen(box, resp)  # drills have their own count
    # ... and none of them counts against a real request.
    resp = await command(box, ALICE, "payments-write 30m INC-9 auth down")
    rid = box.latest_request_id()
    assert not (await row(box, rid)).drill
    assert "waiting for 2 approval(s)" in seen(box, resp)
    assert not [m for m in box.emulator.messages(INCIDENT) if "rate limit" in m.text]
    resp = await command(box, ALICE, "payments-write 30m INC-9 auth down")
    assert "1 requests in the last 10m" in seen(box, resp)


async def test_drill_refusals_say_what_to_do(sandbox: Sandbox) -> None:
    resp = await command(sandbox, ALICE, "drill")
    assert "`/breakglass drill SCOPE" in resp.json["text"]
    resp = await command(sandbox, ALICE, "drill 30m payments-write")
    assert "takes no duration" in resp.json["text"]
    resp = await command(sandbox, "U0MALLORY", "drill payments-write")
    assert "not in a group allowed to request `payments-write`" in seen(sandbox, resp)
    resp = await command(sandbox, ALICE, "drill nope")
    assert "There is no scope `nope`" in seen(sandbox, resp)
    async with sandbox.bot.db.read() as conn:
        from sqlalchemy import func, select

        from bot.store.schema import requests

        assert await conn.scalar(select(func.count()).select_from(requests)) == 0


# --------------------------------------------------------------- breakglass drills, reminder


DRILLS_EVERY = "[drills]\nevery = \"30d\"\n"


def reminders(box: Sandbox) -> list[str]:
    return [m.text for m in box.emulator.messages(INCIDENT) if "*drills due*" in m.text]


async def test_daily_reminder_once_across_replicas(make_box: MakeBox) -> None:
    clock = ManualClock()
    box = await make_box(clock=clock, extra_policy=DRILLS_EVERY)
    # A second bot process on the same database (another replica).
    from bot.runtime import Runtime

    other = Runtime(box.settings, box.bot.policy, clock=clock, sweep_interval=0.05)
    await other.start()
    try:
        await box.emulator.wait_for(lambda: len(reminders(box)) >= 1, timeout=5)
        await asyncio.sleep(0.5)  # both sweepers ran many times meanwhile
        await box.settle()
        assert len(reminders(box)) == 1
        text = reminders(box)[0]
        assert "`db-admin` (never)" in text and "`payments-write` (never)" in text

        # payments-write is rehearsed: the next day only db-admin is due.
        await command(box, ALICE, "drill payments-write")
        rid = box.latest_request_id()
        await approve(box, rid, BOB, CAROL)
        await reveal(box, rid)
        clock.advance(timedelta(hours=23))
        await asyncio.sleep(0.5)
        assert len(reminders(box)) == 1  # not yet a day
        clock.advance(timedelta(hours=1, seconds=1))
        await box.emulator.wait_for(lambda: len(reminders(box)) >= 2, timeout=5)
        await asyncio.sleep(0.5)
        await box.settle()
        assert len(reminders(box)) == 2
        assert "`db-admin` (never)" in reminders(box)[1]
        assert "payments-write" not in reminders(box)[1]
    finally:
        await other.stop(drain_seconds=1.0)


async def test_no_reminder_without_a_schedule(make_box: MakeBox) -> None:
    box = await make_box()
    await asyncio.sleep(0.5)
    await box.settle()
    assert reminders(box) == []


def run_cli(box: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BREAKGLASS_DATABASE_URL": box.database_url,
           "BREAKGLASS_MASTER_KEY": box.master_key, "BREAKGLASS_POLICY": box.settings.policy_path}
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


async def test_breakglass_drills_lists_drills_and_scopes_due(make_box: MakeBox) -> None:
    box = await make_box(extra_policy=DRILLS_EVERY)
    await command(box, ALICE, "drill payments-write INC-3 quarterly")
    rid = box.latest_request_id()
    await approve(box, rid, BOB, CAROL)
    await reveal(box, rid)
    await command(box, ALICE, "drill db-admin")
    pending = box.latest_request_id()

    result = await asyncio.to_thread(run_cli, box, "drills")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    line = next(s for s in out.splitlines() if rid in s)
    assert "payments-write" in line and ALICE in line and "revealed" in line
    assert "command → card" in line and "→ quorum" in line and "→ reveal" in line
    assert pending in out
    due = out[out.index("not rehearsed"):]
    assert "db-admin" in due and "payments-write" not in due

    as_json = await asyncio.to_thread(run_cli, box, "drills", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data: dict[str, Any] = json.loads(as_json.stdout)
    drill = next(d for d in data["drills"] if d["id"] == rid)
    assert drill["to_reveal_s"] >= drill["to_quorum_s"] >= drill["to_card_s"] >= 0
    assert [d["scope"] for d in data["due"]] == ["db-admin"]


@pytest.mark.parametrize("policy_extra", ["", DRILLS_EVERY])
async def test_breakglass_drills_with_no_drills(make_box: MakeBox, policy_extra: str) -> None:
    box = await make_box(extra_policy=policy_extra)
    result = await asyncio.to_thread(run_cli, box, "drills")
    assert result.returncode == 0, result.stderr
    assert "No drills yet" in result.stdout
    if policy_extra:
        assert "db-admin (never)" in result.stdout
    else:
        assert "[drills] every is not set" in result.stdout
    bad = await asyncio.to_thread(run_cli, box, "drills", "--limit", "0")
    assert bad.returncode == 2 and "at least 1" in bad.stderr


async def test_the_card_time_is_read_from_slack_messages_not_the_outbox(
        make_box: MakeBox) -> None:
    """The reveal's transaction reads the card's time by its key in `slack_messages`
    (posted_at), not by a LIKE over every sent outbox row: it holds when the outbox
    has forgotten the post, and the times posted at reveal use it."""
    from sqlalchemy import delete, select

    from bot.store.schema import outbox, slack_messages

    clock = OffsetClock()
    box = await make_box(clock=clock)
    await command(box, ALICE, "drill payments-write INC-7 rehearsal")
    rid = box.latest_request_id()
    await box.settle()
    async with box.bot.db.read() as conn:
        recorded = await conn.scalar(select(slack_messages.c.posted_at)
                                     .where(slack_messages.c.key == f"card:{rid}"))
    assert recorded is not None
    opened = (await row(box, rid)).created_at
    assert recorded.replace(tzinfo=None) >= opened.replace(tzinfo=None)
    async with box.bot.db.transaction() as conn:  # the outbox forgets what it sent
        await conn.execute(delete(outbox).where(outbox.c.status == "sent"))
    clock.advance(timedelta(minutes=3))  # the card went up; the approvers take their time
    async with box.bot.db.transaction() as conn:  # as if Slack had been slow to take it
        await conn.execute(slack_messages.update().where(slack_messages.c.key == f"card:{rid}")
                           .values(posted_at=opened + timedelta(minutes=1)))
    await approve(box, rid, BOB, CAROL)
    await reveal(box, rid)
    async with box.bot.db.read() as conn:
        posted = await drills.card_posted_at(conn, await store.load(conn, rid))
    assert posted.replace(tzinfo=None) == (opened + timedelta(minutes=1)).replace(tzinfo=None)
    [drill] = [r async for r in audit.export(box.bot.db) if r["event"] == "drill"]
    assert 60 <= drill["details"]["to_card_s"] < 61


async def test_drill_expiry_and_restart_keep_it_a_drill(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock)
    await command(box, ALICE, "drill payments-write")
    rid = box.latest_request_id()
    await approve(box, rid, BOB, CAROL)
    # A restart reconciles live grants with the policy: a drill's audience is not "changed".
    await box.stop_bot()
    await box.start_bot()
    assert (await row(box, rid)).state == "issued"
    clock.advance(timedelta(minutes=31))
    await wait_state(box, rid, "expired")
    assert all(p.startswith("DRILL") for p in incident(box, "expired", rid))


# ------------------------------------------------------------------ grammar and policy


def test_drill_grammar() -> None:
    from bot.core.commands import CommandError, Drill, parse_command

    assert parse_command("drill payments-write") == Drill("payments-write", "drill", None)
    assert parse_command("DRILL Payments-Write INC-12 q4 drill") == Drill(
        "payments-write", "INC-12 q4 drill", "INC-12")
    for bad in ("drill", "drill 30m", "drill status"):
        with pytest.raises(CommandError):
            parse_command(bad)


@pytest.mark.parametrize(("change", "error"), [
    (('audience = "db-api"', 'audience = "breakglass-drill"'),
     "scopes.db-admin.audience: 'breakglass-drill' is reserved for drill tokens"),
    (("[clients.payments-api]", '[drills]\nevery = "1x"\n\n[clients.payments-api]'),
     "drills.every: '1x' is not a period: write it like 30d, 7d, 24h or 1d12h"),
    (("[clients.payments-api]", '[drills]\nevery = "400d"\n\n[clients.payments-api]'),
     "drills.every: '400d' is too long: a period can be at most 366d"),
    (("[clients.payments-api]", "[scopes.drill]\n\n[clients.payments-api]"),
     "scopes.drill: 'drill' is a /breakglass subcommand"),
])
def test_drill_policy_errors(change: tuple[str, str], error: str) -> None:
    from bot.core.policy import PolicyError, parse_policy
    from bot.local.sandbox import sandbox_policy

    text = sandbox_policy("http://127.0.0.1:9", "secret").replace(*change)
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors
