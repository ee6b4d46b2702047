"""`breakglass demo`: the whole flow on this machine, told as each person sees it.

Everything is real but Slack: the bot serves HTTP on loopback, requests are
signed as Slack signs them, trigger probes hit a local health endpoint, and a
Slack Web API emulator records what each person and channel would see.
"""

from __future__ import annotations

import base64
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiohttp

from .. import audit
from ..core.clock import OffsetClock
from .emulator import Message
from .sandbox import ALICE, BOB, CAROL, INCIDENT, MALLORY, PEOPLE, REVIEWS, Sandbox

_MENTION = re.compile(r"<@([A-Z0-9]+)>")
_CHANNEL = re.compile(r"<#([A-Z0-9]+)(?:\|[^>]*)?>")
_DATE = re.compile(r"<!date\^[^|>]*\|([^>]*)>")
_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")


class Transcript:
    def __init__(self, box: Sandbox, out: Callable[[str], None]) -> None:
        self.box = box
        self.out = out
        self.step = 0
        self._seen_responses = 0
        self._seen: dict[str, int] = {}  # channel/ts -> number of versions shown

    def name(self, user: str) -> str:
        return PEOPLE.get(user, user).split()[0]

    def plain(self, text: str) -> str:
        text = _MENTION.sub(lambda m: "@" + self.name(m.group(1)), text)
        text = _CHANNEL.sub(lambda m: "#" + self.box.emulator.channel_name(m.group(1)), text)
        text = _DATE.sub(lambda m: m.group(1), text)
        # A real token in the transcript would be a token in a terminal's scrollback.
        text = _JWT.sub(lambda m: m.group(0)[:24] + "…(token, shown once)", text)
        return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")

    def heading(self, text: str) -> None:
        self.step += 1
        self.out(f"\n── {self.step}. {text}")

    def say(self, who: str, text: str) -> None:
        body = self.plain(text).strip().splitlines() or [""]
        self.out(f"   {who}: {body[0]}")
        for line in body[1:]:
            self.out(f"   {' ' * len(who)}  {line}")

    def render_blocks(self, blocks: list[dict[str, Any]]) -> str:
        lines: list[str] = []
        for b in blocks or []:
            if b.get("type") == "header":
                lines.append(f"*{b['text']['text']}*")
            elif b.get("type") == "section":
                lines.append(b["text"]["text"])
            elif b.get("type") == "context":
                lines.extend(e.get("text", "") for e in b.get("elements", []))
            elif b.get("type") == "actions":
                lines.append("  ".join(f"[{e['text']['text']}]" for e in b.get("elements", [])))
        return "\n".join(lines)

    def message_text(self, m: Message) -> str:
        return self.render_blocks(m.blocks) if m.blocks else m.text

    def new_responses(self, user: str) -> None:
        """What the person who typed a command or clicked saw, only for them."""
        for r in self.box.emulator.responses[self._seen_responses:]:
            self.say(f"{self.name(user)} sees (only them)", str(r.body.get("text", "")))
        self._seen_responses = len(self.box.emulator.responses)

    def channel(self, channel: str, label: str) -> None:
        """Each message of `channel` not shown yet, or edited since it was: its latest version."""
        for m in self.box.emulator.messages(channel):
            versions = 1 + len(m.history)
            if self._seen.get(f"{channel}/{m.ts}", 0) == versions:
                continue
            self._seen[f"{channel}/{m.ts}"] = versions
            edited = " (edited)" if versions > 1 else ""
            where = f"{label}, in the card's thread" if m.thread_ts else label
            self.say(f"{where}{edited}", self.message_text(m))


async def run_demo(verbose: bool = False, out: Callable[[str], None] = print) -> int:
    clock = OffsetClock()
    async with Sandbox(clock=clock, sweep_interval=0.1) as box:
        t = Transcript(box, out)
        emu, slack = box.emulator, box.slack
        dm = "DM to alice"
        out("breakglass demo: a Slack emulator, a probe target and the bot, all on loopback.")
        out(f"   bot: {box.url}   Slack Web API emulator: {emu.api_url}")
        out("   alice is on call; bob, carol and dave are SRE leads; mallory is not on call.")
        out("   payments-write needs 2 approvals and the primary auth provider to be down (it is).")

        async def command(user: str, text: str) -> None:
            t.say(f"{t.name(user)} types", f"/breakglass {text}")
            resp = await slack.command(user, text)
            if resp.json and resp.json.get("text"):
                t.say(f"{t.name(user)} sees (only them)", resp.json["text"])
            await box.settle()
            t._seen_responses = max(t._seen_responses, 0)
            t.new_responses(user)

        async def click(user: str, action: str, request_id: str, channel: str, label: str) -> None:
            t.say(f"{t.name(user)} clicks", f"[{label}]")
            await slack.click(user, action, request_id, channel_id=channel)
            await box.settle()
            t.new_responses(user)

        def channels() -> None:
            t.channel(REVIEWS, "#break-glass-reviews")
            t.channel(emu.dm_channel_for(ALICE), dm)
            t.channel(INCIDENT, "#incident-live")

        t.heading("mallory, who is not on call, asks for payments-write")
        await command(MALLORY, "payments-write 30m INC-4521 just looking")

        t.heading("alice asks for db-admin, but the primary database is healthy")
        await command(ALICE, "db-admin 10m INC-4521 want to poke at it")
        channels()

        t.heading("alice asks for payments-write while the auth provider is down")
        await command(ALICE, "payments-write 2h INC-4521 auth provider down, refunds stuck")
        channels()
        rid = box.latest_request_id()

        t.heading("alice tries to approve her own request; mallory tries to approve it")
        await click(ALICE, "bg_approve", rid, REVIEWS, "Approve")
        await click(MALLORY, "bg_approve", rid, REVIEWS, "Approve")

        t.heading("bob approves, then clicks Approve again")
        await click(BOB, "bg_approve", rid, REVIEWS, "Approve")
        await click(BOB, "bg_approve", rid, REVIEWS, "Approve")
        channels()

        t.heading("carol approves: quorum, one token minted")
        await click(CAROL, "bg_approve", rid, REVIEWS, "Approve")
        channels()

        t.heading("alice reveals her token (a modal: Slack keeps no history of it)")
        dm_channel = emu.dm_channel_for(ALICE)
        await click(ALICE, "bg_reveal", rid, dm_channel, "Reveal token")
        view = emu.views[-1].view
        t.say("alice's modal", t.render_blocks(view["blocks"]))
        token = _token_in(view)
        channels()

        t.heading("alice clicks Reveal again")
        await click(ALICE, "bg_reveal", rid, dm_channel, "Reveal token")

        t.heading("the payments API checks the token (RFC 7662 introspection)")
        answer = await _introspect(box, token)
        t.say("payments-api gets", f"active={answer.get('active')} sub={answer.get('sub')} "
              f"scope={answer.get('scope')!r} incident={answer.get('breakglass', {}).get('incident')}")
        await box.settle()
        channels()

        t.heading("bob lists every live grant (approvers and reviewers may)")
        await command(BOB, "tokens")

        t.heading("bob revokes the token: the DM loses its token, the channel hears it, "
                  "and its review opens in the card's thread")
        await command(BOB, f"revoke {rid}")
        channels()
        answer = await _introspect(box, token)
        t.say("payments-api gets", f"active={answer.get('active')}")

        t.heading("alice asks for db-admin once the database is down too; dave approves")
        box.probes.status["db"] = 503
        await command(ALICE, "db-admin 10m INC-4522 primary db refuses writes")
        rid2 = box.latest_request_id()
        await click(DAVE_ID, "bg_approve", rid2, REVIEWS, "Approve")
        await click(ALICE, "bg_reveal", rid2, dm_channel, "Reveal token")
        channels()

        t.heading("eleven minutes pass: the token expires by itself")
        clock.advance(timedelta(minutes=11))
        await emu.wait_for(lambda: any("expired" in (m.text or "") for m in emu.messages(INCIDENT)))
        await box.settle()
        channels()

        t.heading("a quarterly drill: alice rehearses payments-write, the approvers approve "
                  "as for real")
        await command(ALICE, "drill payments-write INC-9001 quarterly drill")
        drill = box.latest_request_id()
        await click(BOB, "bg_approve", drill, REVIEWS, "Approve")
        await click(CAROL, "bg_approve", drill, REVIEWS, "Approve")
        await click(ALICE, "bg_reveal", drill, dm_channel, "Reveal token")
        channels()
        answer = await _introspect(box, _token_in(emu.views[-1].view))
        t.say("payments-api gets", f"active={answer.get('active')} (a drill token opens nothing)")

        t.heading("alice tries to sign off the review of her own grant")
        await command(ALICE, f"review {rid} all fine, nothing to see")

        t.heading("carol clicks Review in the card's thread and signs the review off")
        card = box.card(rid)
        timeline = next(m for m in emu.messages(REVIEWS) if card and m.thread_ts == card.ts)
        t.say("carol clicks", "[Review]")
        await slack.click(CAROL, "bg_review", rid, channel_id=REVIEWS, message_ts=timeline.ts)
        await box.settle()
        t.say("carol's modal", t.render_blocks(emu.views[-1].view["blocks"]))
        summary = ("Refunds replayed by hand with the token; no other writes. Follow-up: "
                   "INC-4530, a second auth provider.")
        t.say("carol writes", summary)
        await slack.submit_view(CAROL, "bg_review_modal",
                                {"summary": {"value": {"type": "plain_text_input",
                                                       "value": summary}}})
        await box.settle()
        channels()

        t.heading("the audit log")
        result = await audit.verify(box.bot.db, box.bot.audit_key)
        events: dict[str, int] = {}
        async for row in audit.export(box.bot.db):
            events[row["event"]] = events.get(row["event"], 0) + 1
        out(f"   {result.rows} rows, MAC chain {'intact' if result.ok else 'BROKEN'}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(events.items())))
        if verbose:
            out("\n── Slack Web API calls the bot made")
            for c in emu.calls:
                out(f"   {c.method}{' (' + c.fault + ')' if c.fault else ''}")
        out("\nDone: every step above went over real HTTP. Run `breakglass serve` against a real "
            "workspace next (docs/setup.md).")
        return 0 if result.ok else 1


DAVE_ID = "U0DAVE"


def _token_in(view: dict[str, Any]) -> str:
    for b in view.get("blocks", []):
        found = _JWT.search(b.get("text", {}).get("text", ""))
        if found:
            return found.group(0)
    print("breakglass demo: the reveal modal held no token", file=sys.stderr)
    return ""


async def _introspect(box: Sandbox, token: str) -> dict[str, Any]:
    auth = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as session, session.post(
        f"{box.url}/oauth2/introspect", data={"token": token},
        headers={"Authorization": f"Basic {auth}"},
    ) as resp:
        result: dict[str, Any] = await resp.json()
        return result
