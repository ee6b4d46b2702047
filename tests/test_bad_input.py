"""Every bad input gets a clear answer (what was wrong, what to do) and changes nothing:
no request row, no decision, no token, no Slack side effect queued. Real bot, real HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import timed
from sqlalchemy import func, select

from bot.core.clock import OffsetClock
from bot.local.emulator import SentRequest
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, MALLORY, REVIEWS, ProbeTarget, Sandbox
from bot.store.schema import audit_log, decisions, outbox, requests

REQUEST = "payments-write 30m INC-4521 auth provider down"

MakeBox = Callable[..., Awaitable[Sandbox]]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def box(tmp_path: Path, database_url: str) -> AsyncIterator[Sandbox]:
    """The conftest sandbox, with ES256 keys: generated in a millisecond where an RSA key
    takes half a second, and these tests do not look at the signing algorithm."""
    async with Sandbox(directory=tmp_path, algorithm="ES256", database_url=database_url) as started:
        yield started


@dataclass(frozen=True)
class World:
    """What a refusal must leave as it was."""

    requests: tuple[tuple[str, str], ...]  # (id, state)
    decisions: int
    tokens: int  # rows holding a token hash or a jti
    outbox: int
    slack_posts: int  # chat.postMessage / chat.update / views.open calls made


async def world(box: Sandbox) -> World:
    async with box.bot.db.read() as conn:
        reqs = (await conn.execute(select(requests.c.id, requests.c.state)
                                   .order_by(requests.c.id))).all()
        n_decisions = await conn.scalar(select(func.count()).select_from(decisions))
        n_tokens = await conn.scalar(select(func.count()).select_from(requests).where(
            requests.c.token_hash.is_not(None) | requests.c.jti.is_not(None)))
        n_outbox = await conn.scalar(select(func.count()).select_from(outbox))
    posts = sum(1 for c in box.emulator.calls
                if c.method in ("chat.postMessage", "chat.update", "views.open"))
    return World(tuple((r[0], r[1]) for r in reqs), int(n_decisions or 0), int(n_tokens or 0),
                 int(n_outbox or 0), posts)


async def refusal_events(box: Sandbox) -> list[str]:
    async with box.bot.db.read() as conn:
        rows = await conn.execute(select(audit_log.c.details).where(audit_log.c.event == "refused")
                                  .order_by(audit_log.c.seq))
        return [r[0] for r in rows]



def seen(box: Sandbox, resp: SentRequest) -> str:
    """All the person saw for one command or click: the ack text and response_url replies."""
    ack = str((resp.json or {}).get("text", ""))
    later = [str(r.body.get("text", "")) for r in box.emulator.responses
             if r.url == resp.response_url]
    return "\n".join([ack, *later])


async def command(box: Sandbox, user: str, text: str) -> str:
    resp = await timed(box.slack.command(user, text))
    await box.settle()
    return seen(box, resp)


async def click(box: Sandbox, user: str, action: str, rid: str) -> str:
    card = box.card(rid)
    assert card is not None
    resp = await timed(box.slack.click(user, action, rid, channel_id=REVIEWS,
                                       message_ts=card.ts))
    await box.settle()
    return seen(box, resp)


async def open_request(box: Sandbox, user: str = ALICE) -> str:
    await command(box, user, REQUEST)
    return box.latest_request_id()


async def refused_unchanged(box: Sandbox, act: Callable[[], Awaitable[str]],
                            *expected: str) -> str:
    """Run act(); its message must contain every expected phrase; nothing may change."""
    before = await world(box)
    message = await act()
    for phrase in expected:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert await world(box) == before
    return message


def incident_posts(box: Sandbox, word: str) -> list[str]:
    return [m.text for m in box.emulator.messages(INCIDENT) if f"*{word}*" in m.text]


@pytest.fixture
async def make_box(tmp_path: Path, new_database: Callable[..., str]) -> AsyncIterator[MakeBox]:
    boxes: list[Sandbox] = []

    async def make(**options: Any) -> Sandbox:
        directory = tmp_path / f"box{len(boxes)}"
        directory.mkdir()
        box = Sandbox(directory=directory, database_url=new_database(), **{"algorithm": "ES256", **options})
        await box.start()
        boxes.append(box)
        return box

    yield make
    for box in boxes:
        await box.stop()


# ------------------------------------------------------------------------- commands


async def test_unknown_scope(box: Sandbox) -> None:
    await refused_unchanged(
        box, lambda: command(box, ALICE, "payments-wrte 30m INC-4521 auth down"),
        "no scope `payments-wrte`", "payments-write", "/breakglass scopes")


@pytest.mark.parametrize("text", ["payments-wrte", "payments-wrte 30m", "payments-wrte soon down"])
async def test_unknown_scope_named_first_when_the_rest_is_missing_too(box: Sandbox,
                                                                       text: str) -> None:
    """Not "a duration is required: /breakglass payments-wrte 30m …", which would be
    refused again once the person added it."""
    message = await refused_unchanged(box, lambda: command(box, ALICE, text),
                                      "There is no scope `payments-wrte`", "`payments-write`",
                                      "/breakglass scopes")
    assert "/breakglass payments-wrte" not in message


async def test_missing_duration(box: Sandbox) -> None:
    await refused_unchanged(box, lambda: command(box, ALICE, "payments-write"),
                            "duration and a reason are required", "/breakglass payments-write 30m")


@pytest.mark.parametrize("duration", ["30", "1x", "-5m", "0m"])
async def test_malformed_duration(box: Sandbox, duration: str) -> None:
    message = await refused_unchanged(
        box, lambda: command(box, ALICE, f"payments-write {duration} INC-4521 down"),
        "/breakglass payments-write 30m")
    assert "duration" in message
    if duration != "0m":
        assert f"'{duration}'" in message and "15m" in message  # shows how to write one


async def test_duration_above_ceiling_is_clamped_with_a_notice(box: Sandbox) -> None:
    message = await command(box, ALICE, "payments-write 2h INC-4521 auth provider down")
    assert "you asked for 2h" in message and "ceiling" in message and "30m" in message
    async with box.bot.db.read() as conn:
        row = (await conn.execute(select(requests))).one()
    assert (row.requested_ttl_s, row.ttl_s) == (2 * 3600, 30 * 60)


async def test_missing_reason(box: Sandbox) -> None:
    await refused_unchanged(box, lambda: command(box, ALICE, "payments-write 30m"),
                            "reason is required", "/breakglass payments-write 30m INC-4521")


async def test_requester_outside_requester_groups(box: Sandbox) -> None:
    await refused_unchanged(box, lambda: command(box, MALLORY, REQUEST),
                            "not in a group allowed to request `payments-write`", "oncall")
    assert any("not_a_requester" in d for d in await refusal_events(box))


async def test_triggers_not_holding(box: Sandbox) -> None:
    box.probes.status["auth"] = 200  # the auth provider is healthy
    before = await world(box)
    message = await command(box, ALICE, REQUEST)
    assert "primary-auth-down" in message and "does not hold" in message
    assert "HTTP 200" in message and "normal access path" in message
    after = await world(box)
    assert after.requests == before.requests and after.tokens == 0
    assert after.decisions == before.decisions
    # The one side effect: the refusal is posted to the incident channel and audited.
    refused = incident_posts(box, "refused")
    assert len(refused) == 1 and f"<@{ALICE}>" in refused[0] and "INC-4521" in refused[0]
    assert after.outbox == before.outbox + 1
    assert any("trigger_not_holding" in d for d in await refusal_events(box))


async def test_hanging_probe_refuses_after_its_timeout(make_box: MakeBox) -> None:
    target = ProbeTarget()  # a health check that has to answer 2xx ("up"), and hangs
    await target.start()
    target.status["cache"] = None
    extra = f"""
[triggers.cache-up]
description = "Cache answers its health check"
http = "{target.url}/cache/health"
holds_when = "up"
timeout = "1s"

[scopes.cache-flush]
description = "Flush the cache"
audience = "cache-api"
permissions = ["cache:flush"]
requesters = ["oncall"]
approvers = ["sre-leads"]
quorum = 1
max_ttl = "10m"
triggers = ["cache-up"]
"""
    try:
        box = await make_box(extra_policy=extra)
        before = await world(box)
        started = time.perf_counter()
        resp = await timed(box.slack.command(ALICE, "cache-flush 5m INC-4521 cache wedged"))
        assert time.perf_counter() - started < 1.0  # acked before the probe gave up
        await box.settle()
        message = seen(box, resp)
        assert "cache-up" in message and "does not hold" in message
        assert "timed out after 1s" in message
        after = await world(box)
        assert after.requests == before.requests and after.tokens == 0
        assert len(incident_posts(box, "refused")) == 1
    finally:
        target._runner._shutdown_timeout = 0.1  # type: ignore[union-attr]  # noqa: SLF001
        await target.stop()


# --------------------------------------------------------------------------- clicks


async def test_approver_clicking_twice(box: Sandbox) -> None:
    rid = await open_request(box)
    await click(box, BOB, "bg_approve", rid)
    await refused_unchanged(box, lambda: click(box, BOB, "bg_approve", rid),
                            "already approved", "counts once")
    await refused_unchanged(box, lambda: click(box, BOB, "bg_deny", rid),
                            "already")


async def test_requester_approving_own_request(box: Sandbox) -> None:
    rid = await open_request(box, BOB)  # BOB is on call and an SRE lead
    await refused_unchanged(box, lambda: click(box, BOB, "bg_approve", rid),
                            "yourself", "Another approver")


async def test_outsider_clicking(box: Sandbox) -> None:
    rid = await open_request(box)
    for action in ("bg_approve", "bg_deny"):
        await refused_unchanged(box, lambda a=action: click(box, MALLORY, a, rid),
                                "Only members of the approver groups", "sre-leads")
    await refused_unchanged(box, lambda: click(box, ALICE, "bg_approve", rid),
                            "yourself")


async def test_click_on_denied_request_and_stale_deny(box: Sandbox) -> None:
    rid = await open_request(box)
    await click(box, BOB, "bg_deny", rid)
    await refused_unchanged(box, lambda: click(box, CAROL, "bg_approve", rid),
                            "already denied", "nothing to decide")
    # CAROL's Slack still shows the old card with its buttons and she clicks Deny on it.
    await refused_unchanged(box, lambda: click(box, CAROL, "bg_deny", rid),
                            "already denied")
    assert len(incident_posts(box, "denied")) == 1


async def test_click_on_expired_request(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock)
    rid = await open_request(box)
    clock.advance(timedelta(minutes=31))
    await box.emulator.wait_for(lambda: bool(incident_posts(box, "expired")), timeout=5)
    await box.settle()
    await refused_unchanged(box, lambda: click(box, BOB, "bg_approve", rid),
                            "already expired", "nothing to decide")


async def test_click_on_issued_request(box: Sandbox) -> None:
    rid = await open_request(box)
    await click(box, BOB, "bg_approve", rid)
    await click(box, CAROL, "bg_approve", rid)
    await refused_unchanged(box, lambda: click(box, DAVE, "bg_approve", rid),
                            "already issued")
    assert len(incident_posts(box, "issued")) == 1


async def test_unknown_action_id(box: Sandbox) -> None:
    rid = await open_request(box)
    await refused_unchanged(box, lambda: click(box, BOB, "bg_approve_all", rid),
                            "not one breakglass knows", "Nothing was changed")


async def test_reveal_by_someone_else_and_a_second_reveal(box: Sandbox) -> None:
    rid = await open_request(box)
    await click(box, BOB, "bg_approve", rid)
    await click(box, CAROL, "bg_approve", rid)
    dm = box.emulator.messages(ALICE)[-1]

    async def reveal(user: str) -> str:
        resp = await timed(box.slack.click(user, "bg_reveal", rid, channel_id=dm.channel,
                                               message_ts=dm.ts))
        await box.settle()
        return seen(box, resp)

    views = len(box.emulator.views)
    await refused_unchanged(box, lambda: reveal(BOB), "Only the requester")
    assert len(box.emulator.views) == views
    await reveal(ALICE)
    assert len(box.emulator.views) == views + 1
    await refused_unchanged(box, lambda: reveal(ALICE), "already revealed",
                            "make a new request")
    assert len(box.emulator.views) == views + 1


# ---------------------------------------------------------------------------- modal


def modal_values(scope: str, duration: str, reason: str) -> dict[str, Any]:
    return {"scope": {"value": {"type": "static_select", "selected_option": {"value": scope}}},
            "duration": {"value": {"type": "plain_text_input", "value": duration}},
            "reason": {"value": {"type": "plain_text_input", "value": reason}}}


@pytest.mark.parametrize(("user", "scope", "duration", "reason", "field", "expected"), [
    (ALICE, "payments-write", "1x", "INC-4521 down", "duration", "15m"),
    (ALICE, "payments-write", "30", "INC-4521 down", "duration", "15m"),
    (ALICE, "payments-write", "-5m", "INC-4521 down", "duration", "15m"),
    (ALICE, "payments-write", "0m", "INC-4521 down", "duration", "15m"),
    (ALICE, "payments-write", "", "INC-4521 down", "duration", "Enter a duration, like 90s"),
    (ALICE, "payments-write", "30 M", "INC-4521 down", "duration", "'30 M' is not a duration"),
    (ALICE, "payments-write", "30m", "   ", "reason", "INC-4521"),
    (ALICE, "payments-wrte", "30m", "INC-4521 down", "scope", "/breakglass scopes"),
    (MALLORY, "payments-write", "30m", "INC-4521 down", "scope", "Ask one of its members"),
])
async def test_modal_bad_input(box: Sandbox, user: str, scope: str, duration: str,
                               reason: str, field: str, expected: str) -> None:
    async def submit() -> str:
        resp = await timed(box.slack.submit_view(user, "bg_request_modal",
                                                     modal_values(scope, duration, reason)))
        await box.settle()
        assert resp.json["response_action"] == "errors"
        return str(resp.json["errors"].get(field, resp.json["errors"]))

    await refused_unchanged(box, submit, expected)


async def test_the_form_for_someone_who_may_request_nothing_is_an_ephemeral_refusal(
        box: Sandbox) -> None:
    """Not a message in their DM with the bot: a refusal is ephemeral (contract §3)."""
    views = len(box.emulator.views)
    message = await refused_unchanged(box, lambda: command(box, MALLORY, ""),
                                      "may not request any scope", "requester group")
    assert len(box.emulator.views) == views  # no form opened
    assert box.emulator.messages(MALLORY) == []
    [reply] = [r for r in box.emulator.responses if "may not request" in r.body.get("text", "")]
    assert reply.body["response_type"] == "ephemeral" and message


async def test_a_form_refused_after_its_probes_is_told_ephemerally(box: Sandbox) -> None:
    """The triggers are probed after Slack has the form's answer: the refusal goes to the
    response_url of the command that opened the form (ephemeral), not into a DM."""
    box.probes.status["auth"] = 200  # the auth provider is healthy
    opened = await timed(box.slack.command(ALICE, ""))
    await box.settle()
    before = await world(box)
    resp = await timed(box.slack.submit_view(
        ALICE, "bg_request_modal", modal_values("payments-write", "30m", "INC-4521 down")))
    await box.settle()
    assert not (resp.json or {}).get("errors")
    [reply] = [r for r in box.emulator.responses if r.url == opened.response_url]
    assert reply.body["response_type"] == "ephemeral"
    assert "does not hold" in reply.body["text"] and "normal access path" in reply.body["text"]
    assert reply.body.get("replace_original") is not True
    assert box.emulator.messages(ALICE) == []  # nothing in her DM
    after = await world(box)
    assert after.requests == before.requests and after.tokens == 0
    assert len(incident_posts(box, "refused")) == 1  # as for the typed command

    # A form that carries no response_url (opened by an older version): told by DM.
    await timed(box.slack.submit_view(ALICE, "bg_request_modal",
                                      modal_values("payments-write", "30m", "INC-4521 down"),
                                      private_metadata=""))
    await box.settle()
    [told] = box.emulator.messages(ALICE)
    assert "does not hold" in told.text


async def test_the_modal_takes_a_duration_as_the_command_does(box: Sandbox) -> None:
    """`/breakglass payments-write 30M …` is 30m; so is 30M typed in the form (a phone's
    keyboard capitalises it)."""
    resp = await timed(box.slack.submit_view(ALICE, "bg_request_modal",
                                             modal_values("payments-write", "30M", "INC-1 down")))
    await box.settle()
    assert not (resp.json or {}).get("errors"), resp.json
    async with box.bot.db.read() as conn:
        row = (await conn.execute(select(requests))).one()
    assert (row.scope, row.ttl_s) == ("payments-write", 30 * 60)


# --------------------------------------------------------------------------- revoke


async def test_revoke_unknown_id(box: Sandbox) -> None:
    await open_request(box)
    await refused_unchanged(box, lambda: command(box, ALICE, "revoke RZZZZZZZ"),
                            "no request or token `RZZZZZZZ`", "/breakglass status")


async def test_revoke_by_outsider(box: Sandbox) -> None:
    rid = await open_request(box)
    await click(box, BOB, "bg_approve", rid)
    await click(box, CAROL, "bg_approve", rid)
    await refused_unchanged(box, lambda: command(box, MALLORY, f"revoke {rid}"),
                            "Only the requester", "or an approver")
    async with box.bot.db.read() as conn:
        state = await conn.scalar(select(requests.c.state).where(requests.c.id == rid))
    assert state == "issued"


async def test_revoke_without_id(box: Sandbox) -> None:
    await refused_unchanged(box, lambda: command(box, ALICE, "revoke"),
                            "Say which token or request to revoke", "/breakglass revoke ID")


# -------------------------------------------------------------------- Slack failing


@pytest.mark.parametrize("fault", ["http_500", "ok_false"])
async def test_slack_api_failure_is_retried_and_nothing_lost(box: Sandbox,
                                                             fault: str) -> None:
    emu = box.emulator
    if fault == "http_500":
        emu.fail("chat.postMessage", 500, times=2)
    else:
        emu.error("chat.postMessage", "internal_error", times=2)
    await timed(box.slack.command(ALICE, REQUEST))
    await box.bot.idle()
    await box.settle(timeout=10)

    assert [c.fault for c in emu.calls_to("chat.postMessage")][:2] == [
        "http_500" if fault == "http_500" else "error:internal_error"] * 2
    rid = box.latest_request_id()
    cards = [m for m in emu.messages(REVIEWS) if f"request {rid}" in m.text]
    assert len(cards) == 1  # delivered, and not twice
    assert len(incident_posts(box, "requested")) == 1
    async with box.bot.db.read() as conn:
        statuses = (await conn.execute(select(outbox.c.status))).scalars().all()
    assert statuses and set(statuses) == {"sent"}

    # The card that arrived late still works.
    await click(box, BOB, "bg_approve", rid)
    assert "1 more" in str(box.card(rid).blocks)
