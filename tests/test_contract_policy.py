"""Contract §2-§4 promises that no other test pinned down, checked the way a user meets
them: trigger semantics (`holds_when`), `/breakglass scopes` showing only what the caller
may request, several approver groups (each person once), `revoke` by any member of the
approver groups, the token's lifetime when the scope has no ceiling of its own, and a
`message`-delivered token taken out of its DM when it expires. Real bot, real HTTP, the
Slack emulator; the defaults the contract names, read from a policy that leaves them out."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import jwt
import pytest
from aiohttp import web
from helpers import command, timed
from sqlalchemy import select

from bot.core.clock import OffsetClock
from bot.core.policy import parse_policy
from bot.local.emulator import Message, SentRequest
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, MALLORY, Sandbox
from bot.store.schema import requests

MakeBox = Callable[..., Awaitable[Sandbox]]
JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")

# A group beside sre-leads: BOB is in both, MALLORY only here.
DIRECTORS = """
[groups.directors]
members = ["U0MALLORY", "U0BOB"]

[scopes.leads-only]
description = "Only SRE leads may ask"
audience = "leads-api"
permissions = ["leads:write"]
requesters = ["sre-leads"]
approvers = ["sre-leads", "directors"]
quorum = 2
"""


def seen(box: Sandbox, resp: SentRequest) -> str:
    ack = str((resp.json or {}).get("text", ""))
    later = [str(r.body.get("text", "")) for r in box.emulator.responses
             if r.url == resp.response_url]
    return "\n".join([ack, *later])


def content(m: Message) -> str:
    return m.text + json.dumps(m.blocks, ensure_ascii=False)


def buttons(m: Message) -> dict[str, str]:
    return {e["action_id"]: e["text"]["text"] for b in m.blocks if b.get("type") == "actions"
            for e in b["elements"] if e.get("type") == "button"}


async def click(box: Sandbox, user: str, action: str, rid: str, on: Message) -> str:
    resp = await timed(box.slack.click(user, action, rid, channel_id=on.channel,
                                       message_ts=on.ts))
    await box.settle()
    return seen(box, resp)


def dm(box: Sandbox, rid: str, user: str = ALICE) -> Message:
    found = [m for m in box.emulator.messages(user) if rid in content(m)]
    assert found, f"no DM to {user} about {rid}"
    return found[-1]


async def state(box: Sandbox, rid: str) -> str:
    async with box.bot.db.read() as conn:
        return str(await conn.scalar(select(requests.c.state).where(requests.c.id == rid)))


async def reveal(box: Sandbox, rid: str, user: str = ALICE) -> dict[str, object]:
    views = len(box.emulator.views)
    await click(box, user, "bg_reveal", rid, dm(box, rid, user))
    assert len(box.emulator.views) == views + 1
    [token] = JWT_RE.findall(json.dumps(box.emulator.views[-1].view))
    return dict(jwt.decode(token, options={"verify_signature": False}))


def standing_in_slack(box: Sandbox) -> str:
    """What stands in Slack now: every message as it is, every ephemeral and reply."""
    emu = box.emulator
    parts = [content(m) for msgs in emu._messages.values() for m in msgs]  # noqa: SLF001
    parts += [e.text + json.dumps(e.blocks) for e in emu.ephemerals]
    parts += [json.dumps(r.body) for r in emu.responses]
    return "\n".join(parts)


# ------------------------------------------------------------------ trigger semantics


@pytest.fixture
async def health() -> AsyncIterator[str]:
    """Health endpoints answering 200, 404 and a 302 redirect (never followed)."""
    async def answer(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "moved":
            raise web.HTTPFound("/elsewhere")  # 3xx: neither "down" nor "up"
        return web.Response(status={"fine": 200, "gone": 404}.get(name, 500))

    async def elsewhere(_: web.Request) -> web.Response:
        return web.Response(status=503)  # were the redirect followed, "down" would hold

    app = web.Application()
    app.router.add_get("/{name}/health", answer)
    app.router.add_get("/elsewhere", elsewhere)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]  # noqa: SLF001
    finally:
        await runner.cleanup()


def _trigger(name: str, url: str, holds_when: str) -> str:
    return (f'\n[triggers.{name}]\ndescription = "{name}"\nhttp = "{url}"\n'
            f'holds_when = "{holds_when}"\ntimeout = "1s"\n')


def _scope(name: str, triggers: list[str]) -> str:
    return (f'\n[scopes.{name}]\ndescription = "{name}"\naudience = "payments-api"\n'
            'permissions = ["payments:read"]\nrequesters = ["oncall"]\n'
            f'approvers = ["sre-leads"]\nquorum = 1\ntriggers = {json.dumps(triggers)}\n')


async def test_triggers_hold_as_the_contract_says(make_box: MakeBox, health: str) -> None:
    """down: a connection error, a timeout or status >= 400 (a redirect is not down);
    up: a 2xx (not a 404, not a redirect). A scope needs all of its triggers."""
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}/health"
        cases = {  # trigger -> holds?
            "refused-down": (refused_url, "down", True),
            "gone-down": (f"{health}/gone/health", "down", True),
            "moved-down": (f"{health}/moved/health", "down", False),
            "fine-down": (f"{health}/fine/health", "down", False),
            "fine-up": (f"{health}/fine/health", "up", True),
            "gone-up": (f"{health}/gone/health", "up", False),
            "moved-up": (f"{health}/moved/health", "up", False),
            "refused-up": (refused_url, "up", False),
        }
        extra = "".join(_trigger(n, url, when) for n, (url, when, _) in cases.items())
        extra += _scope("all-probes", list(cases))
        extra += _scope("holding-probes", [n for n, c in cases.items() if c[2]])
        box = await make_box(extra_policy=extra, algorithm="ES256")

        listing = seen(box, await command(box, ALICE, "scopes"))
        for name, (_, _, holds) in cases.items():
            mark = "✅" if holds else "❌"
            assert f"{mark} *{name}*" in listing, (name, listing)
        assert "connection failed" in listing and "HTTP 302" in listing

        # One trigger not holding refuses the request (posted to the incident channel)...
        before = len(box.emulator.messages(INCIDENT))
        refusal = seen(box, await command(box, ALICE, "all-probes 5m INC-7 probe test"))
        assert "does not hold" in refusal and "moved-down" in refusal
        assert len(box.emulator.messages(INCIDENT)) == before + 1
        with pytest.raises(LookupError):
            box.latest_request_id()
        # ... and when all of them hold, the request opens.
        opened = seen(box, await command(box, ALICE, "holding-probes 5m INC-7 probe test"))
        rid = box.latest_request_id()
        assert rid in opened and await state(box, rid) == "pending"


# ------------------------------------------------------- who sees, approves, revokes


async def test_scopes_lists_only_what_the_caller_may_request(make_box: MakeBox) -> None:
    box = await make_box(extra_policy=DIRECTORS, algorithm="ES256")
    alice = seen(box, await command(box, ALICE, "scopes"))
    assert "`payments-write`" in alice and "`db-admin`" in alice
    assert "leads-only" not in alice  # ALICE is on call, not an SRE lead
    carol = seen(box, await command(box, CAROL, "scopes"))
    assert "`leads-only`" in carol
    assert "payments-write" not in carol and "db-admin" not in carol


async def test_a_click_from_any_approver_group_counts_and_a_person_in_two_counts_once(
        make_box: MakeBox) -> None:
    box = await make_box(extra_policy=DIRECTORS, algorithm="ES256")
    await command(box, CAROL, "leads-only 10m INC-12 lead needs it")
    rid = box.latest_request_id()
    await click(box, BOB, "bg_approve", rid, box.card(rid))  # sre-leads and directors
    said = await click(box, BOB, "bg_approve", rid, box.card(rid))
    assert "already approved" in said
    assert await state(box, rid) == "pending" and "1 more" in content(box.card(rid))
    await click(box, MALLORY, "bg_approve", rid, box.card(rid))  # directors only
    assert await state(box, rid) == "issued"
    assert buttons(box.card(rid)) == {}
    claims = await reveal(box, rid, CAROL)
    assert claims["sub"] == CAROL and claims["aud"] == "leads-api"
    assert claims["breakglass"]["approvers"] == [BOB, MALLORY]  # type: ignore[index]


async def test_any_member_of_the_approver_groups_may_cancel_or_revoke(sandbox: Sandbox) -> None:
    """DAVE is an SRE lead who clicked nothing: still one of the request's approvers."""
    box = sandbox
    await command(box, ALICE, "payments-write 10m INC-5 first")
    pending = box.latest_request_id()
    said = seen(box, await command(box, DAVE, f"revoke {pending}"))
    assert "cancelled" in said and await state(box, pending) == "cancelled"

    await command(box, ALICE, "payments-write 10m INC-6 second")
    issued = box.latest_request_id()
    for user in (BOB, CAROL):
        await click(box, user, "bg_approve", issued, box.card(issued))
    said = seen(box, await command(box, DAVE, f"revoke {issued}"))
    assert "revoked" in said and await state(box, issued) == "revoked"
    assert any("*revoked*" in m.text and issued in m.text
               for m in box.emulator.messages(INCIDENT))
    again = seen(box, await command(box, ALICE, f"revoke {issued}"))
    assert "already revoked" in again


# ------------------------------------------------------------------- token lifetime


async def test_without_a_scope_ceiling_tokens_max_ttl_caps_the_token(make_box: MakeBox) -> None:
    """Lifetime = min(requested, scope max_ttl, tokens.max_ttl): leads-only has no max_ttl,
    so 2h is cut to the 1h of [tokens]; a shorter request is what was asked."""
    box = await make_box(extra_policy=DIRECTORS, algorithm="ES256")
    said = seen(box, await command(box, CAROL, "leads-only 2h INC-8 long job"))
    assert "you asked for 2h" in said and "1h" in said
    long = box.latest_request_id()
    await command(box, ALICE, "payments-write 90s INC-8 quick fix")
    short = box.latest_request_id()
    for user in (BOB, MALLORY):
        await click(box, user, "bg_approve", long, box.card(long))
    for user in (BOB, DAVE):
        await click(box, user, "bg_approve", short, box.card(short))
    claims = await reveal(box, long, CAROL)
    assert int(claims["exp"]) - int(claims["iat"]) == 3600  # type: ignore[call-overload]
    claims = await reveal(box, short)
    assert int(claims["exp"]) - int(claims["iat"]) == 90  # type: ignore[call-overload]


# ---------------------------------------------------------------- message delivery


async def test_message_delivery_expiry_takes_the_token_out_of_the_dm(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(delivery="message", clock=clock, algorithm="ES256")
    await command(box, ALICE, "payments-write 10m INC-9 refunds stuck")
    rid = box.latest_request_id()
    for user in (BOB, CAROL):
        await click(box, user, "bg_approve", rid, box.card(rid))
    carrier = next(m for m in box.emulator.messages(ALICE) if JWT_RE.search(m.text))
    token = JWT_RE.findall(carrier.text)[0]
    clock.advance(timedelta(minutes=11))
    await box.emulator.wait_for(
        lambda: any("*expired*" in m.text and rid in m.text
                    for m in box.emulator.messages(INCIDENT)), timeout=10)
    await box.settle()
    assert await state(box, rid) == "expired"
    assert carrier.history, "the DM that carried the token was not edited"
    assert "expired" in content(carrier) and not JWT_RE.search(content(carrier))
    assert token not in standing_in_slack(box)


# ------------------------------------------------------------------------ defaults


MINIMAL = """
[slack]
reviewer_channel = "C0REVIEWS"
incident_channel = "C0INCIDENT"

[tokens]
issuer = "https://bg.example"

[groups.oncall]
members = ["U01ONCALL1"]

[groups.sre-leads]
members = ["U01LEAD1"]

[scopes.read]
description = "Read"
audience = "api"
permissions = ["api:read"]
requesters = ["oncall"]
approvers = ["sre-leads"]
"""


def test_the_contracts_defaults_when_keys_are_left_out() -> None:
    """Written out, not compared with the models' own defaults: a changed default fails."""
    policy = parse_policy(MINIMAL)
    assert policy.tokens.algorithm == "RS256"  # §4 "alg RS256 by default"
    assert policy.tokens.delivery == "reveal"  # §4 "reveal (the default)"
    assert policy.reviews.due_after == timedelta(hours=24)  # §7 "default 24h"
    assert policy.reviews.reviewers is None  # §7 "default: the scope's approvers"
    assert policy.reviews.hold_requests is False  # §7: without the key, §1-§6 unchanged
    assert policy.alerts.membership_recheck == timedelta(seconds=60)  # §7 "(default 60s)"
    assert policy.webhooks == []
    assert policy.drills.every is None
    scope = policy.scopes["read"]
    assert scope.fallback_approvers == [] and scope.triggers == []
