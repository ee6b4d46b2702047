"""Small helpers shared by the HTTP tests."""

from __future__ import annotations

import time
from collections.abc import Awaitable

from bot.emulator import SentRequest

ACK_LIMIT = 3.0  # Slack's limit for answering a command or a click


async def timed(call: Awaitable[SentRequest]) -> SentRequest:
    """The HTTP answer to a command or click; it must come within Slack's 3 s."""
    started = time.perf_counter()
    resp = await call
    elapsed = time.perf_counter() - started
    assert resp.status == 200, resp.body
    assert elapsed < ACK_LIMIT, f"answered after {elapsed:.2f}s"
    return resp
