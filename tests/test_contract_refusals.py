"""Contract §3/§4: "Every refusal is an ephemeral message (or a `response_url` reply)"
and "Other clicks get an ephemeral refusal". Over real HTTP, every refusal a requester,
an outsider or an approver can provoke with commands and clicks (on the approval card
and in the DM) is checked where Slack would show it: a `response_url` reply that is
ephemeral and, for a click, never replaces the message clicked on (which would rewrite
the approval card or the token DM for everyone); nothing refused reaches a channel, and
the card and the DM stay as they were."""

from __future__ import annotations

import json

from helpers import command, timed

from bot.local.emulator import Message
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, MALLORY, REVIEWS, Sandbox


def versions(m: Message) -> list[str]:
    return [v.text + json.dumps(v.blocks) for v in [*m.history, m]]


async def test_every_refusal_is_ephemeral_and_replaces_nothing(sandbox: Sandbox) -> None:
    box = sandbox
    await command(box, ALICE, "payments-write 30m INC-4521 auth provider down")
    rid = box.latest_request_id()
    await box.slack.click(BOB, "bg_approve", rid, channel_id=REVIEWS, message_ts=box.card(rid).ts)
    await box.settle()
    card = box.card(rid)
    card_before = versions(card)
    channel_posts = {ch: len(box.emulator.messages(ch)) for ch in (REVIEWS, INCIDENT)}
    replies_before = len(box.emulator.responses)

    refusals = []
    for user, text in [(MALLORY, "payments-write 30m INC-4521 just looking"),
                       (ALICE, "paymnts-write 30m INC-4521 typo"), (ALICE, "payments-write 30"),
                       (ALICE, "payments-write 30m"), (MALLORY, f"revoke {rid}"),
                       (ALICE, "revoke RZZZZZZZ"), (MALLORY, "tokens"),
                       (ALICE, f"review {rid} fine"), (ALICE, "scopes please")]:
        resp = await command(box, user, text)
        if not resp.json.get("text", "").startswith(("Checking", "Revoking", "Listing",
                                                     "Signing")):
            # Refused by the ack itself (the grammar): an ephemeral HTTP answer.
            assert resp.json["response_type"] == "ephemeral" and resp.json["text"], resp.json
            continue
        refusals.append(resp.response_url)
    for user, action in [(MALLORY, "bg_approve"), (MALLORY, "bg_deny"), (ALICE, "bg_approve"),
                         (BOB, "bg_approve"), (BOB, "bg_deny"), (CAROL, "bg_nonsense")]:
        resp = await timed(box.slack.click(user, action, rid, channel_id=card.channel,
                                           message_ts=card.ts))
        await box.settle()
        refusals.append(resp.response_url)
    # The refusals changed no channel message and posted nothing to a channel.
    assert versions(box.card(rid)) == card_before
    assert {ch: len(box.emulator.messages(ch)) for ch in (REVIEWS, INCIDENT)} == channel_posts

    # The request issues; the DM's Reveal refused to another person and the second time.
    await box.slack.click(CAROL, "bg_approve", rid, channel_id=REVIEWS, message_ts=card.ts)
    await box.settle()
    token_dm = next(m for m in box.emulator.messages(ALICE) if rid in m.text)
    await box.slack.click(ALICE, "bg_reveal", rid, channel_id=token_dm.channel,
                          message_ts=token_dm.ts)
    await box.settle()
    dm_before = versions(token_dm)
    for user in (BOB, ALICE):
        resp = await timed(box.slack.click(user, "bg_reveal", rid, channel_id=token_dm.channel,
                                           message_ts=token_dm.ts))
        await box.settle()
        refusals.append(resp.response_url)
    assert versions(token_dm) == dm_before

    replies = box.emulator.responses[replies_before:]
    refused = [r for r in replies if r.url in refusals]
    assert len({r.url for r in refused}) == len(refusals)  # every one was answered
    for reply in refused:
        assert reply.body.get("response_type", "ephemeral") == "ephemeral", reply.body
        assert reply.body.get("text"), reply.body  # says what was wrong
    clicked = [r for r in refused if r.url in refusals[-8:]]
    assert len({r.url for r in clicked}) == 8
    assert all(r.body.get("replace_original") is not True for r in clicked), [
        r.body for r in clicked if r.body.get("replace_original")]
