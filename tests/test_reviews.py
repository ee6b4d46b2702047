"""Post-incident reviews (contract section 7.1), through the Slack emulator over HTTP:
the timeline in the card's thread when a grant ends, the Review button and modal,
`/breakglass review`, who may sign off, overdue reminders and alerts, `breakglass
reviews`, and `hold_requests`."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import command, timed
from sqlalchemy import select

from bot.core.clock import OffsetClock
from bot.local.emulator import Message, SentRequest
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, MALLORY, REVIEWS, Sandbox
from bot.store.schema import audit_log, requests, reviews

ROOT = Path(__file__).resolve().parent.parent
REASON = "INC-4521 auth provider down, refunds stuck"
JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")

MakeBox = Callable[..., Awaitable[Sandbox]]


# ------------------------------------------------------------------------ helpers


def content(m: Message) -> str:
    return m.text + json.dumps(m.blocks, ensure_ascii=False)


def buttons(m: Message) -> dict[str, str]:
    return {e["action_id"]: e["text"]["text"] for b in m.blocks if b.get("type") == "actions"
            for e in b["elements"] if e.get("type") == "button"}


def seen(box: Sandbox, resp: SentRequest) -> str:
    ack = str((resp.json or {}).get("text", ""))
    return "\n".join([ack, *[str(r.body.get("text", "")) for r in box.emulator.responses
                             if r.url == resp.response_url]])


async def click(box: Sandbox, user: str, action: str, value: str, *, on: Message) -> SentRequest:
    resp = await timed(box.slack.click(user, action, value, channel_id=on.channel,
                                       message_ts=on.ts))
    await box.settle()
    return resp


async def grant(box: Sandbox, *, reveal: bool = True, user: str = ALICE) -> str:
    """A request by `user`, approved by BOB and CAROL, revealed; returns its ID."""
    await command(box, user, f"payments-write 30m {REASON}")
    rid = box.latest_request_id()
    for approver in (BOB, CAROL):
        await click(box, approver, "bg_approve", rid, on=box.card(rid))
    if reveal:
        dm = [m for m in box.emulator.messages(user) if rid in content(m)][-1]
        await click(box, user, "bg_reveal", rid, on=dm)
    return rid


def token_of(box: Sandbox) -> str:
    found = JWT_RE.findall(json.dumps(box.emulator.views[-1].view))
    assert len(found) == 1
    return found[0]


async def introspect(box: Sandbox, token: str) -> dict[str, Any]:
    auth = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{box.url}/oauth2/introspect", data={"token": token},
                                headers={"Authorization": f"Basic {auth}"}) as resp:
            return dict(await resp.json())


def thread(box: Sandbox, rid: str) -> list[Message]:
    """Replies in the thread under the approval card of `rid`."""
    card = box.card(rid)
    assert card is not None
    return [m for m in box.emulator.messages(REVIEWS) if m.thread_ts == card.ts]


async def wait_thread(box: Sandbox, rid: str, timeout: float = 5.0) -> Message:
    await box.emulator.wait_for(lambda: bool(thread(box, rid)), timeout=timeout)
    await box.settle()
    found = thread(box, rid)
    assert len(found) == 1, [m.text for m in found]
    return found[0]


async def review_row(box: Sandbox, rid: str) -> Any:
    async with box.bot.db.read() as conn:
        return (await conn.execute(select(reviews).where(reviews.c.request_id == rid))).first()


async def events(box: Sandbox, rid: str | None = None) -> list[str]:
    async with box.bot.db.read() as conn:
        q = select(audit_log.c.event).order_by(audit_log.c.seq)
        if rid is not None:
            q = q.where(audit_log.c.request_id == rid)
        return [r[0] for r in await conn.execute(q)]


async def jti_of(box: Sandbox, rid: str) -> str:
    async with box.bot.db.read() as conn:
        return str((await conn.execute(select(requests.c.jti).where(requests.c.id == rid))
                    ).scalar_one())


def incident(box: Sandbox, word: str) -> list[str]:
    return [m.text for m in box.emulator.messages(INCIDENT) if f"*{word}*" in m.text]


def alerts(box: Sandbox) -> list[str]:
    return [m.text for m in box.emulator.messages(INCIDENT) if m.text.startswith(":rotating_light:")]


async def cli(box: Sandbox, *args: str, **env: str) -> tuple[int, str, str]:
    """`python -m bot ARGS` against the sandbox's database, without blocking the bot."""
    assert box.directory is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "BREAKGLASS_DATABASE_URL": box.database_url,
             "BREAKGLASS_MASTER_KEY": box.master_key,
             "BREAKGLASS_POLICY": str(box.directory / "breakglass.toml"), **env})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(), err.decode()


def summary_values(text: str) -> dict[str, Any]:
    return {"summary": {"value": {"type": "plain_text_input", "value": text}}}


# ------------------------------------------------------------------ the thread


async def test_expiry_posts_the_timeline_in_the_cards_thread(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock)
    rid = await grant(box)
    token = token_of(box)
    assert (await introspect(box, token))["active"] is True
    assert (await introspect(box, token))["active"] is True
    await box.bot.introspector.flush()
    assert thread(box, rid) == []  # nothing while the grant is live

    clock.advance(timedelta(minutes=31))
    message = await wait_thread(box, rid)
    shown = content(message)
    for part in ("requested", f"<@{ALICE}>", "approved", f"<@{BOB}>", f"<@{CAROL}>", "issued",
                 "revealed", "first use", "2 use(s)", "expired", "INC-4521", "payments-write"):
        assert part in shown, part
    # each entry with its time, in the order it happened
    lines = next(b["text"]["text"] for b in message.blocks
                 if b.get("type") == "section" and "*Timeline*" in b["text"]["text"])
    order = [w for w in ("requested", "approved", "issued", "revealed", "first use", "expired")
             if w in lines]
    assert order == sorted(order, key=lines.index)
    assert lines.count("<!date^") == 7
    assert buttons(message) == {"bg_review": "Review"}
    assert token not in shown

    stored = await review_row(box, rid)
    assert stored.reviewed_at is None and stored.requester == ALICE
    ended = (await review_row(box, rid)).ended_at
    assert stored.due_at - ended == timedelta(hours=24)  # the default due_after
    assert "review_opened" in await events(box, rid)


async def test_revoke_posts_the_thread_and_the_button_opens_a_modal_that_signs_off(
        sandbox: Sandbox) -> None:
    box = sandbox
    rid = await grant(box)
    token = token_of(box)
    await command(box, ALICE, f"revoke {rid}")
    message = await wait_thread(box, rid)
    assert "revoked" in content(message) and f"<@{ALICE}>" in content(message)

    # The requester cannot open it: refused, no modal.
    views = len(box.emulator.views)
    resp = await click(box, ALICE, "bg_review", rid, on=message)
    assert "someone else" in seen(box, resp)
    assert len(box.emulator.views) == views

    # A reviewer (by default: the scope's approvers) opens it and signs off.
    await click(box, DAVE, "bg_review", rid, on=message)
    assert len(box.emulator.views) == views + 1
    opened = box.emulator.find_view("bg_review_modal")
    assert opened is not None and opened.view["private_metadata"] == rid

    answer = await timed(box.slack.submit_view(DAVE, "bg_review_modal", summary_values("  ")))
    assert "summary" in answer.json["errors"]
    await box.settle()
    assert (await review_row(box, rid)).reviewed_at is None

    answer = await timed(box.slack.submit_view(
        DAVE, "bg_review_modal", summary_values(f"leaked {token}, rotated")))
    assert "remove the token text" in answer.json["errors"]["summary"], answer.body
    await box.settle()
    assert (await review_row(box, rid)).reviewed_at is None

    answer = await timed(box.slack.submit_view(
        DAVE, "bg_review_modal", summary_values("Refunds replayed by hand; <b>no</b> misuse.")))
    assert not (answer.json or {}).get("errors"), answer.body
    await box.settle()

    stored = await review_row(box, rid)
    assert stored.reviewed_by == DAVE and stored.summary.startswith("Refunds replayed")
    edited = thread(box, rid)[0]
    assert edited.history, "the timeline message was not edited"
    assert "Reviewed" in content(edited) and f"<@{DAVE}>" in content(edited)
    assert "&lt;b&gt;no&lt;/b&gt;" in content(edited)  # escaped, not markup
    assert buttons(edited) == {}
    posted = incident(box, "reviewed")
    assert len(posted) == 1 and rid in posted[0] and f"<@{DAVE}>" in posted[0]
    assert (await events(box, rid)).count("reviewed") == 1

    # Signed off: a second sign-off is refused and changes nothing.
    resp = await command(box, CAROL, f"review {rid} again")
    assert "already signed off" in seen(box, resp)
    assert (await review_row(box, rid)).reviewed_by == DAVE


async def test_review_command_refusals_change_nothing(sandbox: Sandbox) -> None:
    box = sandbox
    rid = await grant(box)
    await command(box, BOB, f"revoke {rid}")
    await wait_thread(box, rid)
    live = await grant(box, reveal=False)

    async def refused(user: str, text: str, says: str) -> None:
        before = (len(box.emulator.messages(INCIDENT)), len(box.emulator.messages(REVIEWS)))
        resp = await command(box, user, text)
        assert says in seen(box, resp), seen(box, resp)
        assert (await review_row(box, rid)).reviewed_at is None
        assert (len(box.emulator.messages(INCIDENT)),
                len(box.emulator.messages(REVIEWS))) == before
        assert "reviewed" not in await events(box)

    await refused(ALICE, f"review {rid} all fine", "someone else must review it")
    await refused(MALLORY, f"review {rid} all fine", "Only a member of sre-leads")
    await refused(BOB, f"review {rid}", "A review needs a summary")
    await refused(BOB, "review", "Say which grant")
    await refused(BOB, "review RNOSUCH1 all fine", "There is no grant `RNOSUCH1`")
    await refused(BOB, f"review {live} all fine", "still live")
    assert await review_row(box, live) is None
    # Token-shaped text in the summary (the audit log refuses it): refused with what to
    # do, not "unexpected error"; nothing recorded.
    leaked = token_of(box)
    await refused(BOB, f"review {rid} the leaked token {leaked} was rotated",
                  "Remove the token text")
    resp = await command(box, BOB, f"review {rid} leaked xoxb-{'1' * 12}-abcdefgh")
    assert "Remove the token text" in seen(box, resp) and "unexpected" not in seen(box, resp)
    assert (await review_row(box, rid)).reviewed_at is None

    # The token's jti names the grant as well as the request ID does.
    resp = await command(box, BOB, f"review {await jti_of(box, rid)} Rolled back; fine.")
    assert "signed off" in seen(box, resp)
    assert (await review_row(box, rid)).reviewed_by == BOB


async def test_a_relying_services_revocation_opens_the_review_too(sandbox: Sandbox) -> None:
    """RFC 7009 revocation takes the same path: the thread follows."""
    box = sandbox
    rid = await grant(box)
    token = token_of(box)
    auth = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{box.url}/oauth2/revoke", data={"token": token},
                                headers={"Authorization": f"Basic {auth}"}) as resp:
            assert resp.status == 200
    message = await wait_thread(box, rid)
    assert "revoked" in content(message) and "relying service `payments-api`" in content(message)
    assert (await review_row(box, rid)).reviewed_at is None


async def test_a_request_that_never_issued_needs_no_review(sandbox: Sandbox) -> None:
    box = sandbox
    await command(box, ALICE, f"payments-write 30m {REASON}")
    rid = box.latest_request_id()
    await command(box, ALICE, f"revoke {rid}")  # cancelled while pending
    assert thread(box, rid) == []
    assert await review_row(box, rid) is None
    resp = await command(box, BOB, f"review {rid} nothing happened")
    assert "nothing to review" in seen(box, resp)


# ------------------------------------------------------------------ overdue


async def test_overdue_reviews_remind_alert_once_and_fail_the_cli(make_box: MakeBox) -> None:
    clock = OffsetClock()
    clock.offset = -timedelta(hours=30)  # the grant happened 30 hours ago
    box = await make_box(clock=clock, extra_policy='[reviews]\nremind_every = "2h"\n')
    code, out, err = await cli(box, "reviews", "--overdue")
    assert code == 0, err
    assert "no overdue reviews" in out
    rid = await grant(box)
    await command(box, ALICE, f"revoke {rid}")
    await wait_thread(box, rid)
    assert not alerts(box)  # due 24h after the end, as the bot's clock says

    clock.advance(timedelta(hours=25))  # now 5 hours ago: overdue by one hour
    await box.emulator.wait_for(lambda: bool(alerts(box)), timeout=5)
    await box.settle()

    def reminders() -> list[Message]:
        return [m for m in box.emulator.messages(REVIEWS) if "overdue" in m.text
                and m.thread_ts is None]

    assert len(reminders()) == 1 and rid in reminders()[0].text
    assert len(alerts(box)) == 1 and rid in alerts(box)[0] and "overdue" in alerts(box)[0]
    await asyncio.sleep(0.6)  # a few sweeps: nothing twice
    await box.settle()
    assert len(reminders()) == 1

    clock.advance(timedelta(hours=2))  # remind_every
    await box.emulator.wait_for(lambda: len(reminders()) == 2, timeout=5)
    await box.settle()
    assert (await events(box, rid)).count("review_overdue") == 1
    assert (await events(box, rid)).count("alert") == 1

    clock.offset = timedelta(0)  # back to the present, as the CLI sees it
    code, out, _ = await cli(box, "reviews", "--overdue")
    assert code == 1 and rid in out and "OVERDUE" in out
    code, out, _ = await cli(box, "reviews", "--overdue", "--json")
    assert code == 1
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(r["request_id"], r["requester"], r["overdue"]) for r in listed] == [
        (rid, ALICE, True)]

    resp = await command(box, CAROL, f"review {rid} Late, but done.")
    assert "signed off" in seen(box, resp)
    code, out, _ = await cli(box, "reviews", "--overdue")
    assert code == 0 and "no overdue reviews" in out


async def test_hold_requests_refuses_a_requester_with_an_overdue_review(
        make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, extra_policy="[reviews]\nhold_requests = true\n")
    rid = await grant(box)
    await command(box, BOB, f"revoke {rid}")
    await wait_thread(box, rid)
    clock.advance(timedelta(hours=25))

    def cards() -> int:
        return len([m for m in box.emulator.messages(REVIEWS) if "Break-glass request" in m.text])

    before = cards()
    resp = await command(box, ALICE, f"payments-write 30m {REASON}")
    assert f"overdue post-incident review: {rid}" in seen(box, resp)
    assert cards() == before
    async with box.bot.db.read() as conn:
        assert len((await conn.execute(select(requests.c.id))).all()) == 1

    # Someone else may still ask; once signed off, alice may again.
    resp = await command(box, BOB, f"payments-write 30m {REASON}")
    assert "waiting for" in seen(box, resp)
    await command(box, CAROL, f"review {rid} done")
    resp = await command(box, ALICE, f"payments-write 30m {REASON}")
    assert "waiting for" in seen(box, resp)


async def test_without_hold_the_card_warns_about_overdue_reviews(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock)
    rid = await grant(box)
    await command(box, BOB, f"revoke {rid}")
    await wait_thread(box, rid)
    clock.advance(timedelta(hours=25))

    resp = await command(box, ALICE, f"payments-write 30m {REASON}")
    assert "waiting for" in seen(box, resp)
    new = box.latest_request_id()
    assert new != rid
    card = box.card(new)
    assert "overdue post-incident review" in content(card) and rid in content(card)
    # the warning stays on the card as it is decided
    await click(box, BOB, "bg_approve", new, on=card)
    assert rid in content(box.card(new)) and box.card(new).history


async def test_drill_flag_needs_no_review() -> None:
    from datetime import UTC, datetime

    from bot.core.domain import Request, State
    from bot.core.reviews import needs_review

    now = datetime.now(UTC)
    base = Request(id="R2345678", scope="s", requester=ALICE, reason="r", incident=None,
                   requested_ttl=timedelta(minutes=5), ttl=timedelta(minutes=5),
                   state=State.EXPIRED, created_at=now, expires_at=now, issued_at=now)
    assert needs_review(base)
    assert not needs_review(Request(**{**base.__dict__, "drill": True}))
    assert not needs_review(Request(**{**base.__dict__, "issued_at": None}))
    assert not needs_review(Request(**{**base.__dict__, "state": State.REVEALED}))


async def test_the_sweep_sends_each_overdue_reminder_once_across_processes(
        make_box: MakeBox) -> None:
    """Two bots on one database: the reminder and the alert are claimed once."""
    clock = OffsetClock()
    box = await make_box(clock=clock)
    rid = await grant(box)
    await command(box, BOB, f"revoke {rid}")
    await wait_thread(box, rid)
    from bot.governance.reviews import Reviews

    # A second process's Reviews on the same database, sweeping at the same moment.
    other = Reviews(box.bot.service)
    clock.advance(timedelta(hours=25))
    results = await asyncio.gather(box.bot.reviews.sweep(), other.sweep(), other.sweep())
    await box.settle()
    assert sum(results) <= 2  # one alert and one reminder, whoever sent them
    assert (await events(box, rid)).count("review_overdue") == 1
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        await asyncio.sleep(0.1)
    await box.settle()
    assert len([m for m in box.emulator.messages(REVIEWS) if "overdue" in m.text
                and m.thread_ts is None]) == 1


def test_reviewers_default_to_the_scopes_approvers_and_survive_its_removal() -> None:
    from bot.core.policy import parse_policy
    from bot.local.sandbox import sandbox_policy

    text = sandbox_policy("http://127.0.0.1:9", "secret")
    policy = parse_policy(text)
    assert policy.reviewer_groups("payments-write") == ["sre-leads"]
    assert policy.reviewer_groups("gone-scope") == ["sre-leads"]
    named = parse_policy(text + '\n[reviews]\nreviewers = ["oncall"]\n')
    assert named.reviewer_groups("payments-write") == ["oncall"]
    from bot.core.policy import PolicyError

    with pytest.raises(PolicyError, match="reviews.reviewers: unknown group 'nobody'"):
        parse_policy(text + '\n[reviews]\nreviewers = ["nobody"]\n')


async def test_reviewer_group_from_a_slack_user_group_is_mentioned_and_may_sign_off(
        make_box: MakeBox) -> None:
    clock = OffsetClock()
    auditor = "U0AUDITOR"
    box = await make_box(clock=clock, extra_policy=(
        '[reviews]\nreviewers = ["auditors"]\n\n[groups.auditors]\nusergroup = "S0AUDIT"\n'))
    box.emulator.set_usergroup("S0AUDIT", [auditor])
    rid = await grant(box)
    await command(box, BOB, f"revoke {rid}")
    message = await wait_thread(box, rid)
    assert "auditors" in content(message)

    # An approver who is not a reviewer may not sign off; the user group's member may.
    resp = await command(box, CAROL, f"review {rid} fine")
    assert "Only a member of auditors" in seen(box, resp)
    clock.advance(timedelta(hours=25))
    await box.emulator.wait_for(lambda: any(
        "<!subteam^S0AUDIT>" in m.text for m in box.emulator.messages(REVIEWS)), timeout=5)
    resp = await command(box, auditor, f"review {rid} Checked with the payments team.")
    assert "signed off" in seen(box, resp)
    assert (await review_row(box, rid)).reviewed_by == auditor
