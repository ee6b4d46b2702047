"""Alerts (contract §7.5) and the refusal flood (issue 13, item 4), through the real bot
over loopback HTTP: signed Slack commands and clicks, the Slack emulator, real
introspection calls, and a webhook receiver on loopback. Each alert must be an
incident post starting with :rotating_light:, an audit row `alert` and a webhook
event `alert`."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import command, timed
from webhook_receiver import Receiver

from bot import audit
from bot.core.alerts import ALERT_PREFIX, QuietHours, judge_refusal, parse_quiet_hours
from bot.core.clock import OffsetClock
from bot.governance import alerts
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, MALLORY, Sandbox

JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
REASON = "INC-4521 auth provider down"
MakeBox = Callable[..., Awaitable[Sandbox]]


@pytest.fixture
async def receiver(receivers: Callable[..., Awaitable[Receiver]]) -> Receiver:
    return await receivers()


@pytest.fixture
def make_box(hooked_box: MakeBox, receiver: Receiver) -> MakeBox:
    """A sandbox with `[alerts]` as given and a webhook listing `alert` and `refused`."""

    async def make(alert_lines: str, **options: Any) -> Sandbox:
        return await hooked_box((receiver, ["alert", "refused"]),
                                extra=f"\n[alerts]\n{alert_lines}\n", **options)

    return make


def alert_posts(box: Sandbox) -> list[str]:
    return [m.text for m in box.emulator.messages(INCIDENT) if m.text.startswith(ALERT_PREFIX)]


async def audit_rows(box: Sandbox, event: str | None = None) -> list[dict[str, Any]]:
    return [r async for r in audit.export(box.bot.db) if event is None or r["event"] == event]


async def alert_kinds(box: Sandbox) -> list[str]:
    return [r["details"]["kind"] for r in await audit_rows(box, "alert")]


def webhook_alerts(receiver: Receiver) -> list[str]:
    return [b["details"]["kind"] for b in receiver.delivered() if b["event"] == "alert"]


async def issue_and_reveal(box: Sandbox) -> tuple[str, str]:
    await command(box, ALICE, f"payments-write 30m {REASON}")
    rid = box.latest_request_id()
    for user in (BOB, CAROL):
        card = box.card(rid)
        await timed(box.slack.click(user, "bg_approve", rid, channel_id=card.channel,
                                    message_ts=card.ts))
        await box.settle()
    dm = [m for m in box.emulator.messages(ALICE) if rid in m.text][-1]
    await timed(box.slack.click(ALICE, "bg_reveal", rid, channel_id=dm.channel, message_ts=dm.ts))
    await box.settle()
    [token] = JWT_RE.findall(json.dumps(box.emulator.views[-1].view))
    return rid, token


async def introspect(box: Sandbox, token: str, session: aiohttp.ClientSession) -> dict[str, Any]:
    auth = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
    async with session.post(f"{box.url}/oauth2/introspect", data={"token": token},
                            headers={"Authorization": f"Basic {auth}"}) as resp:
        assert resp.status == 200
        return dict(await resp.json())


def window_around(now: datetime, inside: bool) -> str:
    """A quiet-hours window of two hours that holds `now` (or is twelve hours away)."""
    centre = now if inside else now + timedelta(hours=12)
    start, end = centre - timedelta(hours=1), centre + timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


def assert_alert_everywhere(box: Sandbox, receiver: Receiver, kind: str, kinds: list[str]) -> None:
    assert kind in kinds, kinds
    assert kind in webhook_alerts(receiver)
    assert all(receiver.signature_ok(r) for r in receiver.received)


# --------------------------------------------------------------------------- the rules


async def test_each_request_past_max_requests_per_day_alerts(make_box, receiver):
    box = await make_box("max_requests_per_day = 2", rate_limit=20)
    for n in range(2):
        await command(box, ALICE, f"payments-write 30m INC-{n} attempt {n}")
    assert alert_posts(box) == []
    await command(box, ALICE, f"payments-write 30m {REASON}")
    third = box.latest_request_id()
    [post] = alert_posts(box)
    assert f"<@{ALICE}> opened 3 break-glass requests in the last 24 hours" in post
    assert third in post
    box.probes.status["db"] = 503  # db-admin's trigger holds too
    await command(box, ALICE, f"db-admin 10m {REASON}")  # all scopes count
    assert len(alert_posts(box)) == 2
    kinds = await alert_kinds(box)
    assert kinds == ["max_requests_per_day"] * 2
    assert_alert_everywhere(box, receiver, "max_requests_per_day", kinds)
    [first_alert] = [r for r in await audit_rows(box, "alert")][:1]
    assert first_alert["request_id"] == third
    assert first_alert["details"]["count"] == 3 and first_alert["details"]["limit"] == 2
    await command(box, BOB, f"payments-write 30m {REASON}")  # per requester
    assert len(alert_posts(box)) == 2


async def test_a_request_and_a_first_use_in_quiet_hours_alert(make_box, receiver):
    now = datetime.now(UTC)
    box = await make_box(f'quiet_hours = "{window_around(now, inside=True)}"')
    rid, token = await issue_and_reveal(box)
    kinds = await alert_kinds(box)
    assert kinds == ["quiet_hours"]
    assert f"requested `payments-write` ({rid}) during quiet hours" in alert_posts(box)[0]
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert (await introspect(box, token, session))["active"] is True
    await box.bot.introspector.flush()
    await box.settle()
    kinds = await alert_kinds(box)
    assert kinds == ["quiet_hours", "quiet_hours"]  # the first use only, not every use
    assert "was first used by `payments-api` during quiet hours" in alert_posts(box)[1]
    assert_alert_everywhere(box, receiver, "quiet_hours", kinds)
    assert not any(JWT_RE.search(r.body.decode()) for r in receiver.received)


async def test_outside_quiet_hours_nothing_alerts(make_box):
    box = await make_box(f'quiet_hours = "{window_around(datetime.now(UTC), inside=False)}"')
    _, token = await issue_and_reveal(box)
    async with aiohttp.ClientSession() as session:
        await introspect(box, token, session)
    await box.bot.introspector.flush()
    await box.settle()
    assert alert_posts(box) == [] and await alert_kinds(box) == []


async def test_a_token_over_max_uses_per_minute_alerts_once(make_box, receiver):
    box = await make_box("max_uses_per_minute = 3")
    rid, token = await issue_and_reveal(box)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            await introspect(box, token, session)
        await box.bot.introspector.flush()
        await box.settle()
        assert await alert_kinds(box) == []  # 3 in a minute is the limit, not over it
        for _ in range(10):
            await introspect(box, token, session)
    await box.bot.introspector.flush()
    await box.settle()
    kinds = await alert_kinds(box)
    assert kinds == ["max_uses_per_minute"]  # the uses past it do not alert again
    assert f"The token of {rid} was used more than 3 times in one minute" in alert_posts(box)[0]
    assert_alert_everywhere(box, receiver, "max_uses_per_minute", kinds)


async def test_refusals_past_the_hourly_threshold_alert_and_are_summarised(make_box, receiver):
    """Issue 13, item 4: 40 commands whose trigger does not hold."""
    clock = OffsetClock()
    box = await make_box("refusals_per_hour = 5", clock=clock, rate_limit=100)
    for n in range(40):  # db-admin's trigger (the database is down) does not hold
        resp = await command(box, ALICE, f"db-admin 10m INC-{n} attempt {n}")
        assert "Refused" in json.dumps([r.body for r in box.emulator.responses
                                        if r.url == resp.response_url])
    refused_posts = [m.text for m in box.emulator.messages(INCIDENT) if "*refused*" in m.text]
    assert len(refused_posts) == 6  # five, and the one that crosses the threshold
    [alert] = alert_posts(box)
    assert f"<@{ALICE}> was refused 6 times in the last hour (the limit is 5)" in alert
    audited = [r for r in await audit_rows(box, "refused") if r["actor"] == ALICE]
    singles = [r for r in audited if not r["details"].get("summary")]
    summaries = [r for r in audited if r["details"].get("summary")]
    assert len(singles) == 6
    # The sweeper summarised the rest at once (no summary before), and then waits a minute.
    assert len(summaries) == 1 and summaries[0]["details"]["count"] >= 1
    assert summaries[0]["details"]["codes"] == {"trigger_not_holding":
                                                summaries[0]["details"]["count"]}
    summary_posts = [m.text for m in box.emulator.messages(INCIDENT) if ":no_entry:" in m.text]
    assert len(summary_posts) == 1
    # Whatever was counted after that first summary waits for the minute to pass.
    clock.advance(timedelta(seconds=61))
    await asyncio.sleep(0.5)  # the sweeper runs every 0.2 s
    await box.settle()
    summaries = [r for r in await audit_rows(box, "refused") if r["details"].get("summary")]
    assert sum(r["details"]["count"] for r in summaries) == 34  # every refusal accounted for
    assert len(summaries) <= 2
    assert len(box.emulator.messages(INCIDENT)) <= 10
    kinds = await alert_kinds(box)
    assert kinds == ["refusals_per_hour"]
    assert_alert_everywhere(box, receiver, "refusals_per_hour", kinds)
    assert sum(1 for b in receiver.delivered() if b["event"] == "refused") == 6 + len(summaries)


async def test_refusals_count_towards_the_rate_limit(make_box):
    box = await make_box("refusals_per_hour = 50")  # rate_limit is 5 per 10 minutes
    for n in range(5):
        await command(box, ALICE, f"db-admin 10m INC-{n} attempt {n}")
    probes_before = len([m for m in box.emulator.messages(INCIDENT) if "*refused*" in m.text])
    resp = await command(box, ALICE, f"payments-write 30m {REASON}")
    said = json.dumps([r.body for r in box.emulator.responses if r.url == resp.response_url])
    assert "You made 5 requests in the last 10m (refused attempts count too)" in said
    assert await box.bot.service.count_requests() == 0
    posts = [m.text for m in box.emulator.messages(INCIDENT) if "*refused*" in m.text]
    assert len(posts) == probes_before + 1 and "rate limit reached" in posts[-1]


async def test_harmless_refusals_use_up_no_rate_limit(make_box):
    """A click on a card that just reached quorum, a second reveal: refused and counted,
    but an approver racing clicks (or a requester clicking twice) can still make their
    own request (rate_limit is 5 per 10 minutes)."""
    box = await make_box("refusals_per_hour = 50")
    rid, _ = await issue_and_reveal(box)  # ALICE's one request
    card = box.card(rid)
    dm = [m for m in box.emulator.messages(ALICE) if rid in m.text][-1]
    for _ in range(6):
        await timed(box.slack.click(BOB, "bg_approve", rid, channel_id=card.channel,
                                    message_ts=card.ts))
        await timed(box.slack.click(ALICE, "bg_reveal", rid, channel_id=dm.channel,
                                    message_ts=dm.ts))
    await box.settle()
    codes = [r["details"]["code"] for r in await audit_rows(box, "refused")]
    assert codes.count("request_closed") == 6 and codes.count("already_revealed") == 6, codes
    for user in (BOB, ALICE):
        resp = await command(box, user, f"payments-write 30m {REASON}")
        said = json.dumps([r.body for r in box.emulator.responses if r.url == resp.response_url])
        assert "limit" not in said, said
    assert await box.bot.service.count_requests() == 3
    assert not [m for m in box.emulator.messages(INCIDENT) if "rate limit reached" in m.text]


def test_every_refusal_code_is_counted_or_not_for_the_rate_limit() -> None:
    """Each code the bot refuses with is in exactly one of the two lists (so a new code
    is classified when it is added: docs/policy.md `rate_limit`)."""
    from bot.governance.refusals import NOT_RATE_COUNTED, RATE_COUNTED
    from bot.governance.reviews import SECRET_IN_SUMMARY
    from bot.service import SECRET_IN_REASON

    root = Path(__file__).resolve().parent.parent / "bot"
    found = {SECRET_IN_REASON, SECRET_IN_SUMMARY}
    for path in root.rglob("*.py"):
        found |= set(re.findall(r'Refusal\(\s*"([a-z_]+)"', path.read_text("utf-8")))
    assert not RATE_COUNTED & NOT_RATE_COUNTED
    assert found <= RATE_COUNTED | NOT_RATE_COUNTED, sorted(found - RATE_COUNTED - NOT_RATE_COUNTED)
    assert {"not_a_requester", "not_an_approver", "trigger_not_holding", "rate_limited",
            "unknown_scope"} <= RATE_COUNTED
    assert {"request_closed", "already_revealed", "membership_unconfirmed",
            "grant_live"} <= NOT_RATE_COUNTED
    docs = (root.parent / "docs" / "policy.md").read_text("utf-8")
    for code in RATE_COUNTED:
        assert f"`{code}`" in docs, code


async def test_a_non_requesters_flood_writes_a_summary_not_forty_rows(make_box):
    box = await make_box("")  # no refusals_per_hour: summarised past 5, no alert
    for n in range(40):
        await command(box, MALLORY, f"payments-write 30m INC-{n} let me in")
    await asyncio.sleep(0.5)
    await box.settle()
    rows = [r for r in await audit_rows(box) if r["actor"] == MALLORY]
    assert all(r["event"] == "refused" for r in rows)
    singles = [r for r in rows if not r["details"].get("summary")]
    summaries = [r for r in rows if r["details"].get("summary")]
    assert len(singles) == 6 and 1 <= len(summaries) <= 2
    assert len(singles) + sum(r["details"]["count"] for r in summaries) <= 40
    assert summaries[0]["details"]["codes"] == {"not_a_requester": summaries[0]["details"]["count"]}
    assert alert_posts(box) == [] and await alert_kinds(box) == []
    assert len(rows) < 10


# --------------------------------------------------------------------------- the API


async def test_raise_alert_in_posts_audits_and_reaches_webhooks(make_box, receiver):
    """The helper other use cases call (key rotation, reload refused, overdue review,
    failed checkpoint comparison)."""
    box = await make_box("")
    now = box.bot.clock.now()
    async with box.bot.db.transaction() as conn:
        await alerts.raise_alert_in(conn, box.bot.audit_key, now, INCIDENT,
                                    alerts.RELOAD_REFUSED, "The policy reload was refused.",
                                    {"errors": ["slack: missing required section"]})
    box.bot.dispatcher.wake()
    await box.settle()
    assert alert_posts(box) == [f"{ALERT_PREFIX} *Alert:* The policy reload was refused."]
    [row] = await audit_rows(box, "alert")
    assert row["details"] == {"kind": "reload_refused", "text": "The policy reload was refused.",
                              "errors": ["slack: missing required section"]}
    [event] = [b for b in receiver.delivered() if b["event"] == "alert"]
    assert event["seq"] == row["seq"] and event["details"] == row["details"]


# --------------------------------------------------------------------------- pure rules


def test_quiet_hours_wrap_midnight():
    window = parse_quiet_hours("22:00-06:00")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert window.contains(at.replace(hour=23)) and window.contains(at.replace(hour=5, minute=59))
    assert not window.contains(at.replace(hour=6)) and not window.contains(at.replace(hour=12))
    day = QuietHours(*parse_quiet_hours("09:00-17:00").__dict__.values())
    assert day.contains(at.replace(hour=9)) and not day.contains(at.replace(hour=17))


def test_the_refusal_that_crosses_the_threshold_alerts_and_later_ones_are_summarised():
    assert [judge_refusal(n, 5) for n in (1, 5)] == [judge_refusal(1, 5)] * 2
    assert judge_refusal(5, 5).individually and not judge_refusal(5, 5).alert
    assert judge_refusal(6, 5).individually and judge_refusal(6, 5).alert
    assert not judge_refusal(7, 5).individually and not judge_refusal(7, 5).alert
    assert not judge_refusal(6, 5, drill=True).alert  # drills count for no threshold
    assert not judge_refusal(6, None).alert and not judge_refusal(7, None).individually


async def test_drills_count_for_no_alert_threshold(make_box):
    now = datetime.now(UTC)
    box = await make_box(f'max_requests_per_day = 1\nquiet_hours = "{window_around(now, True)}"',
                         rate_limit=20)
    for _ in range(3):
        await command(box, ALICE, "drill payments-write")
    assert alert_posts(box) == [] and await alert_kinds(box) == []
    await command(box, ALICE, f"payments-write 30m {REASON}")  # the first real one today
    assert await alert_kinds(box) == ["quiet_hours"]


async def test_the_sweep_prunes_use_counters_of_minutes_long_past(make_box):
    """One `uses:<jti>` row per token ever used would stay for ever: the sweep deletes
    those of windows long past and keeps a current one and every other counter."""
    from sqlalchemy import select

    from bot.store.schema import alert_counters

    clock = OffsetClock()
    box = await make_box("max_uses_per_minute = 3", clock=clock, sweep_interval=0.01)

    async def keys() -> set[str]:
        async with box.bot.db.read() as conn:
            return set((await conn.scalars(select(alert_counters.c.key))).all())

    rid, token = await issue_and_reveal(box)
    async with aiohttp.ClientSession() as session:
        await introspect(box, token, session)
    await box.bot.introspector.flush()
    [old] = [k for k in await keys() if k.startswith("uses:")]
    clock.advance(timedelta(hours=2))
    now = clock.now()
    async with box.bot.db.transaction() as conn:
        await conn.execute(alert_counters.insert().values(key="uses:current", window_start=now,
                                                          count=1))
        await conn.execute(alert_counters.insert().values(
            key="refusal-summary:U0TEST", window_start=now - timedelta(hours=3), count=1,
            last_at=now - timedelta(hours=3)))
    for _ in range(300):  # the prune runs every 60 sweeps (0.6 s here)
        if old not in await keys():
            break
        await asyncio.sleep(0.02)
    assert await keys() == {"uses:current", "refusal-summary:U0TEST"}
    assert await alerts.prune_use_counters(box.bot.db, clock.now()) == 0
    assert await alerts.prune_use_counters(box.bot.db, now + timedelta(hours=1)) == 1
