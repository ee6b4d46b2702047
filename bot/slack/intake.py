"""Reading the body of a Slack request before it is known to be Slack's.

Until its signature is checked, a body is anybody's: `POST /slack/events` is on the
public port. So (issue 13, item 1) the headers are checked first (a missing, stale or
malformed stamp is refused without reading a byte; `signature.check_headers`), and
then the body is read

* with a deadline (`BODY_TIMEOUT`): Slack sends its few kilobytes at once and gives
  up on an answer after 3 s, so a body still arriving after that is not Slack's;
* within a budget shared by every request in flight (`UNVERIFIED_BUDGET` bytes of
  unverified bodies held at once): over it, the request is answered 503 with
  `Retry-After` at once, so many slow senders cannot make the bot hold gigabytes.

Bytes count against the budget as they arrive (a connection that sent nothing holds
nothing), and are given back as soon as the signature is checked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

BODY_TIMEOUT = 5.0  # seconds a Slack request body may take to arrive
UNVERIFIED_BUDGET = 32 * 1024 * 1024  # bytes of unverified bodies held at once, all requests
CHUNK = 64 * 1024


class BodyRefused(Exception):
    """The body was not read: `status` and `message` say why (413, 408 or 503)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


@dataclass
class BodyBudget:
    """Bytes of unverified request bodies held at once, by every request together."""

    limit: int = UNVERIFIED_BUDGET
    held: int = 0
    refused: int = 0  # requests answered 503 because the budget was spent

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            self.refused += 1
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class Reservation:
    """The bytes one request holds against a BodyBudget; `release()` gives them back."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> bool:
        if not self.budget.take(n):
            return False
        self.held += n
        return True

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


async def read_body(request: web.Request, limit: int, reservation: Reservation,
                    timeout: float = BODY_TIMEOUT) -> bytes:
    """The whole body, at most `limit` bytes, within `timeout` seconds and the budget.
    Raises BodyRefused otherwise. The caller releases `reservation` once it has checked
    the signature (or given up)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyRefused(413, "too_large", "Slack request bodies are at most 1 MiB.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(CHUNK):
                if len(body) + len(chunk) > limit:
                    raise BodyRefused(413, "too_large", "Slack request bodies are at most 1 MiB.")
                if not reservation.take(len(chunk)):
                    raise BodyRefused(503, "busy", "Too many request bodies are arriving at "
                                      "once; retry in a second.")
                body += chunk
    except TimeoutError:
        raise BodyRefused(408, "body_timeout", f"The body did not arrive within {timeout:g}s; "
                          "Slack sends it at once.") from None
    return bytes(body)
