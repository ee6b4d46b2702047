"""The whole breakglass story, end to end: the real bot over loopback HTTP, the Slack
emulator playing Slack, a probe target playing the auth provider. Nothing is mocked."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import jwt
import pytest
from helpers import command, timed
from sqlalchemy import select

from bot.core.clock import OffsetClock
from bot.local.emulator import Message, SentRequest
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, MALLORY, REVIEWS, Sandbox
from bot.store.schema import audit_log, decisions, requests

JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
REASON = "INC-4521 auth provider down, refunds stuck"
ISSUER = "https://breakglass.example.internal"

MakeBox = Callable[..., Awaitable[Sandbox]]


# --------------------------------------------------------------------------- helpers





def replies(box: Sandbox, resp: SentRequest) -> list[str]:
    """What the bot later posted to this command's or click's response_url."""
    return [str(r.body.get("text", "")) for r in box.emulator.responses
            if r.url == resp.response_url]


def seen(box: Sandbox, resp: SentRequest) -> str:
    """Everything the person saw for one command or click: the ack, then the replies."""
    ack = str((resp.json or {}).get("text", ""))
    return "\n".join([ack, *replies(box, resp)])


async def request(box: Sandbox, user: str = ALICE, text: str = f"payments-write 30m {REASON}"
                  ) -> tuple[SentRequest, str]:
    resp = await command(box, user, text)
    return resp, box.latest_request_id()


def content(m: Message) -> str:
    """A message's current text and blocks, as one string."""
    return m.text + json.dumps(m.blocks, ensure_ascii=False)


def all_versions(m: Message) -> list[str]:
    return [v.text + json.dumps(v.blocks, ensure_ascii=False) for v in m.history] + [content(m)]


def buttons(m: Message) -> dict[str, str]:
    """action_id -> label of every button in the message."""
    return {e["action_id"]: e["text"]["text"] for b in m.blocks if b.get("type") == "actions"
            for e in b["elements"] if e.get("type") == "button"}


def dm(box: Sandbox, rid: str, user: str = ALICE) -> Message:
    found = [m for m in box.emulator.messages(user) if rid in m.text or rid in content(m)]
    assert found, f"no DM to {user} about {rid}"
    return found[-1]


def incident(box: Sandbox, word: str, rid: str | None = None) -> list[str]:
    """Incident-channel posts that say *word* (requested, issued, expired, …)."""
    return [m.text for m in box.emulator.messages(INCIDENT)
            if f"*{word}*" in m.text and (rid is None or rid in m.text)]


async def click(box: Sandbox, user: str, action: str, rid: str, *, on: Message) -> SentRequest:
    resp = await timed(box.slack.click(user, action, rid, channel_id=on.channel,
                                       message_ts=on.ts))
    await box.settle()
    return resp


async def approve(box: Sandbox, rid: str, *users: str) -> None:
    for user in users:
        await click(box, user, "bg_approve", rid, on=box.card(rid))


async def row(box: Sandbox, rid: str) -> Any:
    async with box.bot.db.read() as conn:
        return (await conn.execute(select(requests).where(requests.c.id == rid))).one()


async def events(box: Sandbox, rid: str) -> list[str]:
    async with box.bot.db.read() as conn:
        rows = await conn.execute(select(audit_log.c.event).where(audit_log.c.request_id == rid)
                                  .order_by(audit_log.c.seq))
        return [r[0] for r in rows]


async def wait_state(box: Sandbox, rid: str, state: str, timeout: float = 5.0) -> None:
    """Wait for the sweeper to move the request to `state`, then for its Slack effects."""
    async def current() -> str:
        return str((await row(box, rid)).state)

    deadline = time.monotonic() + timeout
    while await current() != state:
        assert time.monotonic() < deadline, f"{rid} still {await current()}, not {state}"
        await asyncio.sleep(0.05)
    await box.settle()


async def reveal(box: Sandbox, rid: str) -> str:
    """ALICE clicks Reveal token in her DM; returns the token the modal shows."""
    views_before = len(box.emulator.views)
    resp = await click(box, ALICE, "bg_reveal", rid, on=dm(box, rid))
    assert len(box.emulator.views) == views_before + 1, replies(box, resp)
    found = JWT_RE.findall(json.dumps(box.emulator.views[-1].view))
    assert len(found) == 1
    return found[0]


async def public_key(box: Sandbox, kid: str) -> jwt.PyJWK:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{box.url}/.well-known/jwks.json") as resp:
            keys = (await resp.json())["keys"]
    return jwt.PyJWK(next(k for k in keys if k["kid"] == kid))


def database_bytes(box: Sandbox) -> bytes:
    """The SQLite database as it is on disk, WAL included."""
    assert box.directory is not None
    return b"".join(p.read_bytes() for p in sorted(box.directory.glob("breakglass.db*")))


def everything_in_slack(box: Sandbox) -> str:
    """Every message version in every channel, every ephemeral and response_url post."""
    emu = box.emulator
    parts = [v for msgs in emu._messages.values() for m in msgs for v in all_versions(m)]  # noqa: SLF001
    parts += [e.text + json.dumps(e.blocks) for e in emu.ephemerals]
    parts += [json.dumps(r.body) for r in emu.responses]
    return "\n".join(parts)


def release_hung_probes_at_stop(box: Sandbox) -> None:
    """The sandbox's probe target keeps a hung probe's handler asleep for an hour, and
    aiohttp waits up to 60 s for it at cleanup: let the cleanup cancel it at once."""
    box.probes._runner._shutdown_timeout = 0.1  # type: ignore[union-attr]  # noqa: SLF001


# ------------------------------------------------------------------------ happy path


async def test_whole_flow_from_command_to_expiry(make_box: MakeBox,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = OffsetClock()
    box = await make_box(clock=clock)
    emu = box.emulator

    # 1. The command is acknowledged, ephemerally, within the HTTP response.
    resp = await timed(box.slack.command(ALICE, f"payments-write 2h {REASON}"))
    assert resp.json["response_type"] == "ephemeral"
    assert "payments-write" in resp.json["text"]
    await box.settle()
    rid = box.latest_request_id()

    # 2. The response_url reply names the request (and the clamp to the 30m ceiling).
    reply = "\n".join(replies(box, resp))
    assert rid in reply and "30m" in reply and "ceiling" in reply

    # 3. The card: requester, scope, permissions, duration, reason, incident, triggers.
    card = box.card(rid)
    assert card is not None and card.channel == REVIEWS
    assert buttons(card) == {"bg_approve": "Approve", "bg_deny": "Deny"}
    shown = content(card)
    for part in (f"<@{ALICE}>", "payments-write", "payments:read", "payments:write", "30m",
                 REASON, "INC-4521", "primary-auth-down", "HTTP 503"):
        assert part in shown, part
    assert len(incident(box, "requested", rid)) == 1

    # 4. BOB approves: the card says one more is needed.
    await approve(box, rid, BOB)
    card = box.card(rid)
    assert f"<@{BOB}>" in content(card) and "1 more" in content(card)
    assert set(buttons(card)) == {"bg_approve", "bg_deny"}
    assert incident(box, "issued") == []

    # 5. CAROL approves: issued once, card closed, DM with a Reveal button.
    await approve(box, rid, CAROL)
    assert len(incident(box, "issued")) == 1
    card = box.card(rid)
    assert buttons(card) == {}
    assert f"<@{BOB}>" in content(card) and f"<@{CAROL}>" in content(card)
    message = dm(box, rid)
    assert message.channel == emu.dm_channel_for(ALICE)
    assert buttons(message).get("bg_reveal") == "Reveal token"
    assert (await row(box, rid)).state == "issued"

    # 6. ALICE reveals: the modal holds an RFC 9068 JWT.
    token = await reveal(box, rid)
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt" and header["alg"] == "RS256" and header["kid"]
    key = await public_key(box, header["kid"])
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience="payments-api",
                        issuer=ISSUER)
    assert set(claims) == {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id",
                           "scope", "breakglass"}
    assert claims["sub"] == ALICE and claims["aud"] == "payments-api"
    assert claims["scope"] == "payments:read payments:write"
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] - claims["iat"] == 30 * 60  # min(2h asked, scope 30m, tokens 1h)
    assert len(claims["jti"]) >= 22 and claims["client_id"]
    assert claims["breakglass"] == {"request_id": rid, "incident": "INC-4521",
                                    "approvers": [BOB, CAROL]}
    assert "refunds" not in json.dumps(claims)  # the reason stays out of the token
    assert buttons(dm(box, rid)) == {"bg_revoke": "Revoke"}

    # 7. The database keeps the hash, never the token.
    stored = await row(box, rid)
    assert stored.state == "revealed"
    assert stored.token_hash == hashlib.sha256(token.encode()).hexdigest()
    on_disk = database_bytes(box)
    assert token.encode() not in on_disk
    assert token.rsplit(".", 1)[1].encode() not in on_disk  # not even the signature

    # 8. The token expires: the DM is edited, the channel hears it.
    clock.advance(timedelta(minutes=31))
    await wait_state(box, rid, "expired")
    assert len(incident(box, "expired", rid)) == 1
    final_dm = dm(box, rid)
    assert final_dm.history, "the DM was not edited"
    assert "expired" in content(final_dm) and buttons(final_dm) == {}
    assert token not in everything_in_slack(box)
    assert not JWT_RE.search(everything_in_slack(box))
    # Outside the reveal modal the token never went to Slack, nor into a log.
    for call in emu.calls:
        if call.method != "views.open":
            assert token not in json.dumps(call.params)
    assert token not in caplog.text
    story = ["requested", "approved", "approved", "issued", "revealed", "expired"]
    assert [e for e in await events(box, rid) if e in story] == story


# -------------------------------------------------------------------------- delivery


async def test_message_delivery_puts_token_in_dm_and_revoke_removes_it(
        make_box: MakeBox) -> None:
    box = await make_box(delivery="message")
    _, rid = await request(box)
    await approve(box, rid, BOB, CAROL)

    message = dm(box, rid)
    found = JWT_RE.findall(message.text)
    assert len(found) == 1
    token = found[0]
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert (await row(box, rid)).token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token.encode() not in database_bytes(box)

    resp = await command(box, ALICE, f"revoke {rid}")
    assert "revoked" in seen(box, resp)
    assert (await row(box, rid)).state == "revoked"
    message = dm(box, rid)
    assert token not in content(message)
    assert not JWT_RE.search(content(message))
    assert len(incident(box, "revoked", rid)) == 1


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
async def test_other_signing_algorithms(make_box: MakeBox, algorithm: str) -> None:
    box = await make_box(algorithm=algorithm)
    _, rid = await request(box)
    await approve(box, rid, BOB, CAROL)
    token = await reveal(box, rid)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm and header["typ"] == "at+jwt"
    key = await public_key(box, header["kid"])
    claims = jwt.decode(token, key.key, algorithms=[algorithm], audience="payments-api",
                        issuer=ISSUER)
    assert claims["breakglass"]["request_id"] == rid


# ----------------------------------------------------------------- closing a request


async def test_one_deny_closes_the_request(sandbox: Sandbox) -> None:
    _, rid = await request(sandbox)
    await click(sandbox, BOB, "bg_deny", rid, on=sandbox.card(rid))
    assert (await row(sandbox, rid)).state == "denied"
    card = sandbox.card(rid)
    assert buttons(card) == {} and "Denied" in content(card)
    assert len(incident(sandbox, "denied", rid)) == 1
    assert "denied" in dm(sandbox, rid).text
    assert incident(sandbox, "issued") == []


async def test_request_without_quorum_expires(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock)
    _, rid = await request(box)
    await approve(box, rid, BOB)
    clock.advance(timedelta(minutes=31))
    await wait_state(box, rid, "expired")
    card = box.card(rid)
    assert buttons(card) == {} and "Expired without enough approvals" in content(card)
    assert len(incident(box, "expired", rid)) == 1
    assert "expired" in dm(box, rid).text
    assert incident(box, "issued") == []


async def test_escalation_reminder_before_expiry(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, escalate="5m")
    _, rid = await request(box)
    clock.advance(timedelta(minutes=6))

    def reminded() -> bool:
        return any(rid in m.text and "still needs" in m.text
                   for m in box.emulator.messages(REVIEWS))

    await box.emulator.wait_for(reminded, timeout=5)
    await box.settle()
    assert (await row(box, rid)).state == "pending"
    reminders = [m for m in box.emulator.messages(REVIEWS) if "still needs" in m.text]
    assert len(reminders) == 1 and "2 approval(s)" in reminders[0].text
    assert "escalated" in await events(box, rid)


# --------------------------------------------------------------------- subcommands


async def test_help(sandbox: Sandbox) -> None:
    resp = await command(sandbox, ALICE, "help")
    assert resp.json["response_type"] == "ephemeral"
    for form in ("/breakglass SCOPE DURATION REASON", "scopes", "status", "revoke ID"):
        assert form in resp.json["text"]


async def test_scopes_shows_live_trigger_state(sandbox: Sandbox) -> None:
    resp = await command(sandbox, ALICE, "scopes")
    text = "\n".join(replies(sandbox, resp))
    assert "`payments-write`" in text and "`db-admin`" in text
    line = next(s for s in text.splitlines() if "`payments-write`" in s)
    assert "ready" in line
    line = next(s for s in text.splitlines() if "`db-admin`" in s)
    assert "refused right now" in line
    assert "✅ *primary-auth-down*" in text and "HTTP 503" in text
    assert "❌ *primary-db-down*" in text and "HTTP 200" in text

    resp = await command(sandbox, MALLORY, "scopes")
    assert "may not request any scope" in "\n".join(replies(sandbox, resp))


async def test_status_lists_pending_and_active(sandbox: Sandbox) -> None:
    _, issued = await request(sandbox)
    await approve(sandbox, issued, BOB, CAROL)
    sandbox.probes.status["db"] = 503
    _, pending = await request(sandbox, text="db-admin 10m INC-4522 primary db refuses writes")
    resp = await command(sandbox, ALICE, "status")
    text = "\n".join(replies(sandbox, resp))
    assert re.search(rf"{pending}.*pending", text)
    assert re.search(rf"{issued}.*issued", text)

    resp = await command(sandbox, CAROL, "status")
    assert "no pending requests" in "\n".join(replies(sandbox, resp))


async def test_requester_cancels_and_approver_revokes(sandbox: Sandbox) -> None:
    _, first = await request(sandbox)
    resp = await command(sandbox, ALICE, f"revoke {first}")
    assert "cancelled" in seen(sandbox, resp)
    assert (await row(sandbox, first)).state == "cancelled"
    assert buttons(sandbox.card(first)) == {}
    assert len(incident(sandbox, "cancelled", first)) == 1

    _, second = await request(sandbox)
    await approve(sandbox, second, BOB, CAROL)
    resp = await command(sandbox, BOB, f"revoke {second}")
    assert "revoked" in seen(sandbox, resp)
    assert (await row(sandbox, second)).state == "revoked"
    assert len(incident(sandbox, "revoked", second)) == 1
    message = dm(sandbox, second)
    assert "revoked" in message.text and "bg_reveal" not in buttons(message)


async def test_revoke_button_in_the_dm(sandbox: Sandbox) -> None:
    _, rid = await request(sandbox)
    await approve(sandbox, rid, BOB, CAROL)
    await reveal(sandbox, rid)
    resp = await click(sandbox, ALICE, "bg_revoke", rid, on=dm(sandbox, rid))
    assert "revoked" in "\n".join(replies(sandbox, resp))
    assert (await row(sandbox, rid)).state == "revoked"
    assert len(incident(sandbox, "revoked", rid)) == 1
    assert buttons(dm(sandbox, rid)) == {}


async def test_concurrent_clicks_issue_exactly_one_token(sandbox: Sandbox) -> None:
    _, rid = await request(sandbox)
    card = sandbox.card(rid)
    clicks = [timed(sandbox.slack.click(user, "bg_approve", rid, channel_id=REVIEWS,
                                        message_ts=card.ts))
              for user in (BOB, CAROL, DAVE, BOB, CAROL, DAVE)]
    await asyncio.gather(*clicks)
    await sandbox.settle()
    assert (await row(sandbox, rid)).state == "issued"
    assert len(incident(sandbox, "issued")) == 1
    assert len([m for m in sandbox.emulator.messages(ALICE) if "bg_reveal" in content(m)]) == 1
    async with sandbox.bot.db.read() as conn:
        approvals = (await conn.execute(select(decisions.c.user_id).where(
            decisions.c.request_id == rid))).scalars().all()
    assert len(approvals) == len(set(approvals)) == 2


# --------------------------------------------------------------------------- modal


async def test_bare_command_opens_modal_and_submitting_it_creates_a_request(
        sandbox: Sandbox) -> None:
    resp = await command(sandbox, ALICE, "")
    assert resp.status == 200
    opened = sandbox.emulator.find_view("bg_request_modal")
    assert opened is not None
    assert "payments-write" in json.dumps(opened.view)

    values = {
        "scope": {"value": {"type": "static_select",
                            "selected_option": {"value": "payments-write"}}},
        "duration": {"value": {"type": "plain_text_input", "value": "20m"}},
        "reason": {"value": {"type": "plain_text_input", "value": REASON}},
    }
    answer = await timed(sandbox.slack.submit_view(ALICE, "bg_request_modal", values))
    assert not (answer.json or {}).get("errors"), answer.body
    await sandbox.settle()
    rid = sandbox.latest_request_id()
    stored = await row(sandbox, rid)
    assert (stored.requester, stored.scope, stored.ttl_s, stored.incident) == (
        ALICE, "payments-write", 20 * 60, "INC-4521")
    assert rid in dm(sandbox, rid).text


# ---------------------------------------------------------------- Slack's 3 seconds


async def test_acks_stay_fast_when_probe_and_slack_hang(sandbox: Sandbox) -> None:
    emu = sandbox.emulator
    release_hung_probes_at_stop(sandbox)
    sandbox.probes.status["auth"] = None  # the auth provider hangs: probe times out (2s)
    resp = await timed(sandbox.slack.command(ALICE, f"payments-write 30m {REASON}"))
    assert resp.json["response_type"] == "ephemeral"
    await sandbox.settle()
    rid = sandbox.latest_request_id()
    assert "timed out" in content(sandbox.card(rid))

    emu.hang("chat.postMessage", 3.2, times=2)  # Slack's API is slower than Slack's limit
    card = sandbox.card(rid)
    await timed(sandbox.slack.click(BOB, "bg_approve", rid, channel_id=REVIEWS,
                                    message_ts=card.ts))
    await timed(sandbox.slack.click(CAROL, "bg_approve", rid, channel_id=REVIEWS,
                                    message_ts=card.ts))
    await timed(sandbox.slack.command(ALICE, "status"))
    await timed(sandbox.slack.command(ALICE, "scopes"))
    await timed(sandbox.slack.command(BOB, f"payments-write 30m {REASON}"))
    await sandbox.settle(timeout=20)
    assert (await row(sandbox, rid)).state == "issued"
    assert len(incident(sandbox, "issued", rid)) == 1
    assert buttons(dm(sandbox, rid)).get("bg_reveal")
