"""The escalation ladder, through the emulator over HTTP: at `escalate_after` a reminder in
the card's thread mentioning the approver groups, the fallback approvers' clicks counting
from then on, their DMs with the card's permalink, the requester told, and expiry as before."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from test_flow import (
    MakeBox,
    buttons,
    click,
    content,
    events,
    incident,
    replies,
    request,
    row,
    wait_state,
)

from bot.core.clock import OffsetClock
from bot.local.emulator import Message
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, REVIEWS, Sandbox
from bot.runtime import Runtime
from bot.store.schema import decisions

DIRECTOR, DIRECTOR2 = "U0DIRECTOR", "U0DIRECTOR2"
FALLBACK = f'[groups.eng-directors]\nmembers = ["{DIRECTOR}", "{DIRECTOR2}"]\n'
LADDER: dict[str, Any] = {
    "escalate": "5m", "scope_extra": 'fallback_approvers = ["eng-directors"]',
    "extra_policy": FALLBACK,
}




def thread_replies(box: Sandbox, card: Message) -> list[Message]:
    return [m for m in box.emulator.messages(REVIEWS) if m.thread_ts == card.ts]


async def escalated(box: Sandbox, card: Message, clock: OffsetClock) -> Message:
    clock.advance(timedelta(minutes=6))
    await box.emulator.wait_for(lambda: bool(thread_replies(box, card)), timeout=5)
    await box.settle()
    (reminder,) = thread_replies(box, card)
    return reminder


async def test_the_escalation_ladder(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, approver_usergroup="S0LEADS", **LADDER)
    box.emulator.set_usergroup("S0LEADS", [BOB, CAROL, DAVE])
    _, rid = await request(box)
    card = box.card(rid)

    # Before escalate_after a fallback approver's click is refused and changes nothing.
    resp = await click(box, DIRECTOR, "bg_approve", rid, on=card)
    refusal = "\n".join(replies(box, resp))
    assert "fallback approver" in refusal and "eng-directors" in refusal
    await click(box, BOB, "bg_approve", rid, on=card)
    assert thread_replies(box, card) == []

    reminder = await escalated(box, card, clock)
    # 1. In the card's thread, mentioning the approver group's Slack user group.
    assert "<!subteam^S0LEADS>" in reminder.text and "1 approval(s)" in reminder.text
    assert "eng-directors count too" in reminder.text and rid in reminder.text
    # The card says so, and names the fallback groups.
    shown = content(box.card(rid))
    assert "escalated" in shown and "eng-directors" in shown
    # 2. Each fallback approver got a DM with the card's permalink.
    link = box.emulator.permalink(REVIEWS, card.ts)
    for director in (DIRECTOR, DIRECTOR2):
        (dm,) = [m for m in box.emulator.messages(director) if rid in m.text]
        assert link in dm.text and "escalated" in dm.text
    permalinks = box.emulator.calls_to("chat.getPermalink")
    assert {c.params["message_ts"] for c in permalinks} == {card.ts}
    # 3. The requester sees the step.
    told = [m.text for m in box.emulator.messages(ALICE) if rid in m.text]
    assert len(told) == 1 and "sre-leads were reminded" in told[0]
    assert "eng-directors were asked too" in told[0]

    # 4. From now on a fallback approver's click counts: quorum, token issued.
    await click(box, DIRECTOR, "bg_approve", rid, on=box.card(rid))
    stored = await row(box, rid)
    assert stored.state == "issued" and stored.escalated_at is not None
    async with box.bot.db.read() as conn:
        counted = (await conn.execute(select(decisions.c.user_id).where(
            decisions.c.request_id == rid))).scalars().all()
    assert sorted(counted) == sorted([BOB, DIRECTOR])
    assert len(incident(box, "issued", rid)) == 1
    assert (await events(box, rid)).count("escalated") == 1


async def test_groups_without_a_usergroup_are_named_with_their_members(
        make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, **LADDER)
    _, rid = await request(box)
    card = box.card(rid)
    reminder = await escalated(box, card, clock)
    assert "*sre-leads*" in reminder.text and "<!subteam^" not in reminder.text
    for person in (BOB, CAROL, DAVE):
        assert f"<@{person}>" in reminder.text
    assert f"<@{ALICE}> for" in reminder.text  # the requester is named as such only


async def test_escalation_once_across_replicas_then_expiry_as_before(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, **LADDER)
    other = Runtime(box.settings, box.bot.policy, clock=clock, sweep_interval=0.05)
    await other.start()
    try:
        _, rid = await request(box)
        card = box.card(rid)
        await escalated(box, card, clock)
        await asyncio.sleep(0.5)  # both sweepers ran many times
        await other.dispatcher.drain(2)
        await box.settle()
        assert len(thread_replies(box, card)) == 1
        assert len([m for m in box.emulator.messages(DIRECTOR) if rid in m.text]) == 1
        assert (await events(box, rid)).count("escalated") == 1
    finally:
        await other.stop(drain_seconds=1.0)
    clock.advance(timedelta(minutes=25))
    await wait_state(box, rid, "expired")
    assert buttons(box.card(rid)) == {}
    assert any("expired without enough approvals" in m.text
               for m in box.emulator.messages(ALICE))
    # A fallback approver's click after the close counts for nothing.
    resp = await click(box, DIRECTOR2, "bg_approve", rid, on=box.card(rid))
    assert "already expired" in "\n".join(replies(box, resp))


async def test_no_fallback_approvers_no_dms(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, escalate="5m")
    _, rid = await request(box)
    card = box.card(rid)
    reminder = await escalated(box, card, clock)
    assert "count too" not in reminder.text
    assert box.emulator.calls_to("chat.getPermalink") == []
    told = [m.text for m in box.emulator.messages(ALICE) if rid in m.text]
    assert len(told) == 1 and "were asked too" not in told[0]


async def test_a_drill_escalates_too(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, **LADDER)
    await box.slack.command(ALICE, "drill payments-write")
    await box.settle()
    rid = box.latest_request_id()
    reminder = await escalated(box, box.card(rid), clock)
    assert reminder.text.startswith("DRILL")
    for director in (DIRECTOR, DIRECTOR2):
        assert all(m.text.startswith("DRILL") for m in box.emulator.messages(director))


# ------------------------------------------------------------------ the policy's side


def _policy(**options: Any) -> str:
    from bot.local.sandbox import sandbox_policy

    return sandbox_policy("http://127.0.0.1:9", "secret", **options)


@pytest.mark.parametrize(("options", "error"), [
    ({"escalate": "5m", "scope_extra": 'fallback_approvers = ["directors"]'},
     "scopes.payments-write.fallback_approvers: unknown group 'directors' "
     "(defined groups: oncall, sre-leads)"),
    ({"scope_extra": 'fallback_approvers = ["oncall"]'},
     "scopes.payments-write.fallback_approvers: fallback approvers count only after "
     "requests.escalate_after, which is not set"),
    ({"escalate": "5m", "scope_extra": 'fallback_approvers = "oncall"'},
     "scopes.payments-write.fallback_approvers: must be a list"),
])
def test_fallback_approvers_are_checked(options: dict[str, Any], error: str) -> None:
    from bot.core.policy import PolicyError, parse_policy

    with pytest.raises(PolicyError) as caught:
        parse_policy(_policy(**options))
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


def test_fallback_approvers_parse() -> None:
    from bot.core.policy import parse_policy

    policy = parse_policy(_policy(escalate="5m", scope_extra=LADDER["scope_extra"],
                                  extra=FALLBACK))
    assert policy.scopes["payments-write"].fallback_approvers == ["eng-directors"]
    assert "with fallback eng-directors" in policy.summary()
