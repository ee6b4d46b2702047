"""Acks first: background work starts only while no Slack request is being answered.

Slack gives an answer 3 seconds; the work behind a command or a click (probes,
the database, Slack calls) has no such deadline. They share one event loop, so
under a burst of a hundred commands, an answer would wait behind the work of
the commands before it. Here, work waits at its start instead: until no Slack
request has been in progress for `QUIET` seconds, and then one starts per turn
of the event loop, so a request that arrives meanwhile is read before the next
one starts. No work waits longer than `MAX_DEFER`, however busy the front is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator

QUIET = 0.002  # seconds without a Slack request in progress before work starts
MAX_DEFER = 0.5  # seconds; the longest any work waits for a quiet moment


class Foreground:
    def __init__(self) -> None:
        self.active = 0
        self._last = 0.0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._releasing = False

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around the answer to one Slack request."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            loop = asyncio.get_running_loop()
            self._last = loop.time()
            if self.active == 0 and self._waiting and self._timer is None and not self._releasing:
                self._timer = loop.call_later(QUIET, self._release)

    def answered(self) -> None:
        """A Slack request was answered (synchronously, with no await) just now."""
        with self.busy():
            pass

    def quiet(self) -> bool:
        return self.active == 0 and asyncio.get_running_loop().time() - self._last >= QUIET

    async def wait(self) -> None:
        """Return when background work may start."""
        if not self._waiting and self.quiet():
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiting.append(fut)
        late = loop.call_later(MAX_DEFER, _set, fut)
        if self._timer is None and not self._releasing:
            self._timer = loop.call_later(QUIET, self._release)
        try:
            await fut
        finally:
            late.cancel()
            with contextlib.suppress(ValueError):
                self._waiting.remove(fut)

    def _release(self) -> None:
        """Let one waiter go, then look again on the next turn of the loop."""
        self._timer = None
        self._releasing = False
        loop = asyncio.get_running_loop()
        if not self.quiet():
            if self.active == 0:  # quiet soon: look again then
                self._timer = loop.call_later(QUIET, self._release)
            return  # otherwise the end of the last request in progress looks again
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                break
        if self._waiting:
            self._releasing = True
            loop.call_soon(self._release)


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


MAX_HOLD = 10.0  # seconds; the longest the outbox holds its sends for a revocation pass
PASS_FIRST = 1.0  # seconds; the longest a Slack request's work waits for a pass


class Passes:
    """Revocation passes in progress (`reconcile.revoke_many`: a reload that ends
    thousands of grants). While one runs, the outbox holds its sends (`hold`, before
    each claim and each row), so the pass, which is what makes the tokens stop
    working, has the event loop to itself between Slack's requests; what it queued
    goes out right after. A hold never lasts longer than `MAX_HOLD`. The work behind a
    Slack request that was answered already (`Runtime.dispatch_later`, a listener's
    spawn) waits too, for at most `PASS_FIRST`: well inside the 3 s a click's
    `trigger_id` lives, so a modal still opens."""

    def __init__(self) -> None:
        self.running = 0
        self._done: asyncio.Event | None = None

    @contextlib.contextmanager
    def running_pass(self) -> Iterator[None]:
        if self.running == 0:
            self._done = asyncio.Event()
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            if self.running == 0 and self._done is not None:
                self._done.set()

    async def hold(self, limit: float = MAX_HOLD) -> None:
        """Return at once when no pass runs; else when it ends, or after `limit` seconds."""
        done = self._done
        if self.running == 0 or done is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), limit)
