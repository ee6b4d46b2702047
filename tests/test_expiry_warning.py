"""The expiry warning (`[tokens] warn_before`, default 5m), through the emulator over HTTP:
the requester's DM says when the token expires and how to ask again, once per token across
replicas; `message` delivery gets a new DM so the token text stays; no extension."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from test_flow import (
    JWT_RE,
    MakeBox,
    approve,
    buttons,
    content,
    dm,
    events,
    request,
    reveal,
    row,
    wait_state,
)

from bot.core.clock import OffsetClock
from bot.local.emulator import Message
from bot.local.sandbox import ALICE, BOB, CAROL, Sandbox
from bot.runtime import Runtime

WARNING = "cannot be extended"




def warnings(box: Sandbox, rid: str) -> list[str]:
    """Every message version to ALICE about `rid` that carries the warning."""
    found = []
    for m in box.emulator.messages(ALICE):
        for version in [v.text + str(v.blocks) for v in m.history] + [content(m)]:
            if rid in version and WARNING in version:
                found.append(version)
    return found


async def warned(box: Sandbox, rid: str, count: int = 1) -> None:
    await box.emulator.wait_for(lambda: len(warnings(box, rid)) >= count, timeout=5)
    await box.settle()


async def test_revealed_token_warned_once_across_replicas(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock)
    other = Runtime(box.settings, box.bot.policy, clock=clock, sweep_interval=0.05)
    await other.start()
    try:
        _, rid = await request(box)  # 30m
        await approve(box, rid, BOB, CAROL)
        await reveal(box, rid)
        clock.advance(timedelta(minutes=24))
        await asyncio.sleep(0.4)
        assert warnings(box, rid) == []  # 6 minutes left: not yet
        clock.advance(timedelta(minutes=2))
        await warned(box, rid)
        await asyncio.sleep(0.5)  # both sweepers ran many times
        await other.dispatcher.drain(2)
        await box.settle()
    finally:
        await other.stop(drain_seconds=1.0)
    message = dm(box, rid)
    text = content(message)
    assert WARNING in text and "`/breakglass payments-write DURATION INC-4521" in text
    assert buttons(message) == {"bg_revoke": "Revoke"}  # the DM keeps its button
    assert len(message.history) == 2  # revealed, then warned: one edit for the warning
    assert (await events(box, rid)).count("expiry_warned") == 1
    assert (await row(box, rid)).warned_at is not None
    # No extension: the token still ends when it did, and the DM is cleaned up then.
    clock.advance(timedelta(minutes=5))
    await wait_state(box, rid, "expired")
    assert WARNING not in content(dm(box, rid)) and "expired" in content(dm(box, rid))


async def test_warning_before_reveal_keeps_the_reveal_button(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, tokens_extra='warn_before = "10m"')
    _, rid = await request(box)
    await approve(box, rid, BOB, CAROL)
    clock.advance(timedelta(minutes=21))
    await warned(box, rid)
    assert buttons(dm(box, rid)) == {"bg_reveal": "Reveal token", "bg_revoke": "Revoke"}
    await reveal(box, rid)
    assert WARNING in content(dm(box, rid))  # still there once revealed


async def test_message_delivery_gets_a_new_dm_and_keeps_the_token(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock, delivery="message")
    _, rid = await request(box)
    await approve(box, rid, BOB, CAROL)
    token_dm: Message = next(m for m in box.emulator.messages(ALICE) if JWT_RE.search(m.text))
    clock.advance(timedelta(minutes=26))
    await warned(box, rid)
    assert JWT_RE.search(token_dm.text) and token_dm.history == []  # untouched
    new = [m for m in box.emulator.messages(ALICE) if WARNING in content(m)]
    assert len(new) == 1 and new[0] is not token_dm and not JWT_RE.search(content(new[0]))


async def test_a_token_shorter_than_the_warning_gets_none(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock)
    _, rid = await request(box, text="payments-write 5m INC-4521 auth provider down")
    await approve(box, rid, BOB, CAROL)
    await reveal(box, rid)
    clock.advance(timedelta(minutes=2))
    await asyncio.sleep(0.5)
    await box.settle()
    assert warnings(box, rid) == []
    assert "expiry_warned" not in await events(box, rid)


async def test_a_drill_warning_says_drill(make_box: MakeBox) -> None:
    clock = OffsetClock()
    box = await make_box(clock=clock)
    await box.slack.command(ALICE, "drill payments-write")  # 15m, the default
    await box.settle()
    rid = box.latest_request_id()
    await approve(box, rid, BOB, CAROL)
    clock.advance(timedelta(minutes=11))
    await warned(box, rid)
    text = content(dm(box, rid))
    assert text.startswith("DRILL") and "`/breakglass drill payments-write`" in text
