"""Every user-supplied field (the reason, the incident reference, a review's summary,
the scope and the ID as typed) is escaped in every message that shows it, whatever kind of message it is.

One flow with a permissive `incident_pattern` (the incident is `INC-1<!channel>`) and
pings in the reason drives every kind of message the bot sends about a request: the
approval card and its edits, the incident channel's requested, issued, used, denied,
cancelled, revoked, expired (request and token) and refused posts, the reminder, the
expiry warning, the DMs (reveal, revealed, closed, denied, expired), the token modal,
`/breakglass status`, `/breakglass tokens`, a review's summary (in the thread and the
incident channel), a drill, and the acks and replies to commands typed with pings as
scope or ID. Then, class-wide: no message anywhere carries a ping unescaped; and each
kind of message that shows the incident shows it escaped (so the first check is not
passing because the field was left out).
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bot.core.clock import OffsetClock
from bot.local.emulator import SentRequest
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, REVIEWS, Sandbox

PINGS = ("<!channel>", "<!here>", "<!everyone>", "<@U0MALLORY>", "<https://evil.example|x>",
         "<#C0GENERAL>", "<!subteam^S0EVIL>")
INCIDENT_REF = "INC-1<!channel>"
SHOWN = "INC-1&lt;!channel&gt;"
REVIEW = "rotated the key <!channel> ping <@U0MALLORY> <https://evil.example|x>"
REASON = (f"{INCIDENT_REF} auth down <!here> <@U0MALLORY> <https://evil.example|x> "
          "<#C0GENERAL> <!subteam^S0EVIL> & <!everyone>")


def slack_escaped(text: str) -> str:
    """Slack sends &, < and > of command text escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


async def _do(box: Sandbox, sent: Any) -> SentRequest:
    resp: SentRequest = await sent
    await box.settle()
    return resp


async def _request(box: Sandbox, acks: list[SentRequest], user: str = ALICE,
                   words: str = "payments-write 30m") -> str:
    acks.append(await _do(box, box.slack.command(user, slack_escaped(f"{words} {REASON}"))))
    return box.latest_request_id()


async def _click(box: Sandbox, acks: list[SentRequest], user: str, action: str, rid: str) -> None:
    channel = REVIEWS if action in ("bg_approve", "bg_deny") else box.emulator.dm_channel_for(user)
    acks.append(await _do(box, box.slack.click(user, action, rid, channel_id=channel)))


def everything_sent(box: Sandbox, acks: list[SentRequest]) -> list[tuple[str, str]]:
    """(where, text) of every Web API call, response_url reply and HTTP acknowledgement."""
    out = [(f"{c.method} {c.params.get('channel', '')}", json.dumps(c.params, ensure_ascii=False))
           for c in box.emulator.calls]
    out += [("reply", json.dumps(r.body, ensure_ascii=False)) for r in box.emulator.responses]
    out += [("ack", json.dumps(a.json, ensure_ascii=False)) for a in acks if a.json]
    return out


async def test_every_field_is_escaped_in_every_kind_of_message(tmp_path: Path) -> None:
    clock = OffsetClock()
    box = Sandbox(directory=tmp_path, clock=clock, escalate="2m", rate_limit=50,
                  incident_pattern=r"[^ ]+",
                  extra_policy='\n[alerts]\nmax_requests_per_day = 1\n')
    await box.start()
    acks: list[SentRequest] = []
    try:
        issued = await _request(box, acks)
        for approver in (BOB, CAROL):
            await _click(box, acks, approver, "bg_approve", issued)
        await _click(box, acks, ALICE, "bg_reveal", issued)
        token = json.dumps(box.emulator.views[-1].view).split("```")[1]
        basic = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
        async with aiohttp.ClientSession() as http, http.post(
                f"{box.url}/oauth2/introspect", data={"token": token},
                headers={"Authorization": f"Basic {basic}"}) as resp:
            assert (await resp.json())["active"] is True
        await box.bot.introspector.summarise_uses()
        await box.settle()
        acks.append(await _do(box, box.slack.command(ALICE, "status")))
        denied = await _request(box, acks)
        await _click(box, acks, DAVE, "bg_deny", denied)
        cancelled = await _request(box, acks)
        acks.append(await _do(box, box.slack.command(ALICE, f"revoke {cancelled}")))
        acks.append(await _do(box, box.slack.command(BOB, f"revoke {issued}")))
        waiting = await _request(box, acks)
        expiring = await _request(box, acks)
        for approver in (BOB, CAROL):
            await _click(box, acks, approver, "bg_approve", expiring)
        acks.append(await _do(box, box.slack.command(BOB, "tokens")))  # the live inventory
        acks.append(await _do(box, box.slack.command(CAROL, slack_escaped(
            f"review {issued} {REVIEW}"))))  # a summary is user text too
        clock.advance(timedelta(minutes=3))
        await box.bot.service.sweep()  # the reminder about `waiting`
        await box.settle()
        clock.advance(timedelta(minutes=23))
        await box.bot.service.sweep()  # the expiry warning of `expiring`
        await box.settle()
        clock.advance(timedelta(minutes=6))
        await box.bot.service.sweep()  # both expire
        await box.settle()
        drill = await _request(box, acks, words="drill payments-write")
        for approver in (BOB, CAROL):
            await _click(box, acks, approver, "bg_approve", drill)
        await _click(box, acks, ALICE, "bg_reveal", drill)
        box.probes.status["auth"] = 200  # the trigger no longer holds: a refusal post
        acks.append(await _do(box, box.slack.command(
            ALICE, slack_escaped(f"payments-write 30m {REASON}"))))
        for typed in ("<!here> 30m INC-2 x", "revoke <!channel>", "payments-write <!here> x",
                      "<!here>", "list <!channel>", "drill <!here>", "<@U0MALLORY> 5m x"):
            acks.append(await _do(box, box.slack.command(ALICE, slack_escaped(typed))))
        assert waiting
        sent = everything_sent(box, acks)
    finally:
        await box.stop()

    # 1. Class-wide: nothing the bot sent carries a ping as it was typed.
    for where, text in sent:
        for ping in PINGS:
            assert ping.lower() not in text.lower(), f"{where}: {ping} unescaped in {text}"

    # 2. The field was shown, escaped, in every kind of message that shows it.
    incident_posts = [t for w, t in sent if w.startswith("chat.") and INCIDENT in w]
    for word in ("requested", "issued", "used", "denied", "cancelled", "revoked", "expired",
                 "refused"):
        assert any(f"*{word}*" in t and SHOWN in t for t in incident_posts), word
    cards = [t for w, t in sent if w.startswith("chat.") and REVIEWS in w]
    assert any(SHOWN in t and "auth down &lt;!here&gt; &lt;@U0MALLORY&gt;" in t for t in cards)
    assert any("&lt;!subteam^S0EVIL&gt;" in t and "&amp; &lt;!everyone&gt;" in t for t in cards)
    reviewed = [t for _, t in sent if "rotated the key &lt;!channel&gt; ping" in t]
    assert reviewed, "the review's summary is shown, escaped"
    replies = [t for w, t in sent if w in ("reply", "ack")]
    assert any(SHOWN in t and expiring in t for t in replies)  # /breakglass tokens
    for shown in ("There is no scope `&lt;!here&gt;`", "no request or token `&lt;!channel&gt;`",
                  "`list` is not a /breakglass command", "`&lt;@u0mallory&gt;`"):
        assert any(shown in t for t in replies), shown
