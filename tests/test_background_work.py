"""Review findings on the acks-first path, now guarded: a command whose Bolt dispatch
fails after the ack still gets a request or a reply (never silently dropped), and an
unsigned body trickling in does not hold back background work (only a signed request
counts as one being answered)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot.local.sandbox import ALICE, Sandbox
from bot.store.schema import requests

REQUEST = "payments-write 30m INC-4521 auth provider down"


@pytest.fixture
async def box(tmp_path: Path, database_url: str) -> AsyncIterator[Sandbox]:
    async with Sandbox(directory=tmp_path, algorithm="ES256", database_url=database_url) as started:
        yield started


async def test_review_a_command_whose_bolt_dispatch_fails_is_not_dropped_silently(
        box: Sandbox) -> None:
    """The HTTP ack ("Checking `payments-write`…") now goes out before Bolt runs. Bolt's
    single-team authorization calls auth.test on the first request; when that fails
    (SlackApiError), Bolt answers 200 with an apology body and runs no listener. Before,
    that body reached the user as the command's answer; now `Runtime._dispatch` only logs
    for status >= 500, so the request is acknowledged and then nothing happens: no request,
    no reply on the response_url, nothing logged by breakglass."""
    box.emulator.error("auth.test", "ratelimited")
    sent = await box.slack.command(ALICE, REQUEST)
    assert sent.status == 200
    await box.settle()
    async with box.bot.db.read() as conn:
        opened = int(await conn.scalar(select(func.count()).select_from(requests)) or 0)
    replies = [r for r in box.emulator.responses if r.body.get("text")]
    assert opened == 1 or replies, (
        "the command was acknowledged, then silently dropped (no request, no reply)")


async def test_review_an_unsigned_slow_body_does_not_hold_back_background_work(
        box: Sandbox) -> None:
    """Only a signed request counts as one being answered. Were reading the body counted,
    anyone who can reach the port could trickle a body (no signature needed) and make every
    piece of background work (use cases, outbox rounds) wait the full MAX_DEFER."""
    import asyncio
    import time

    reader, writer = await asyncio.open_connection("127.0.0.1", box.bot.port)
    writer.write(b"POST /slack/events HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: 100000\r\n\r\ncommand=%2Fbreakglass")
    await writer.drain()
    try:
        await asyncio.sleep(0.1)
        assert box.bot.foreground.active == 0, "an unsigned, unfinished body counts as answered"
        started = time.perf_counter()
        await box.bot.foreground.wait()
        waited = time.perf_counter() - started
        assert waited < 0.1, (
            f"background work waited {waited:.2f}s behind an unauthenticated, unfinished body")
    finally:
        writer.close()
