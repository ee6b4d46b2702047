"""The one way out to Slack for events (and, through `senders`, the way out for the
other delivery channels: `bot/delivery/webhooks.py`).

A use case writes outbox rows in the same transaction as its state change
(`enqueue`); the `Dispatcher` delivers them after commit. So a state change
and the Slack messages it implies are committed together or not at all, and
a crash or a Slack outage between the two only delays the messages.

Delivery
--------

* Order is kept per lane (one lane per channel, one per DM): a lane's rows go
  out in id order, and a row that must wait (backoff, Retry-After, or a lease
  held by another process) holds back every later row of its lane. Lanes do
  not wait for each other.
* Failures: HTTP 5xx, connection errors, timeouts and `ok: false` errors that
  may be transient are retried with exponential backoff and jitter
  (`base_delay * 2**(attempt-1)`, capped at `max_delay`, drawn from the upper
  half of that window). A 429 waits exactly its Retry-After (capped at
  `max_delay`) and does not use up an attempt: it is Slack pacing us, not the
  event failing. `ok: false` errors that no retry will fix
  (`PERMANENT_ERRORS`) dead-letter at once; anything else dead-letters after
  `max_attempts`. A dead letter is logged at ERROR with its event id, counted
  in `breakglass_outbox_dead_letters_total`, and stays in the table with its
  last error until `breakglass outbox retry` (`retry_dead`) queues it again.
  A dead row does not hold its lane.
* Rows are claimed with a lease (a `next_attempt_at` in the future), renewed
  as the lane is worked through, so two processes on one database never send
  the same row at once. The lease is longer than the Slack client's timeout.
  A process that dies mid-delivery leaves its rows leased: they go out when
  the lease runs out, from whichever process is alive (or the restarted one).
* A round looks at each lane's first BATCH_PER_LANE pending rows only, found
  through the partial index `ix_outbox_pending_lane` (pending rows by lane and
  id): the look costs in proportion to the lanes with pending rows, so a backlog
  of tens of thousands (a large revocation pass, a long Slack outage) does not
  hold the event loop (`_DUE_SQL`).
* A post that carries a `key` (approval cards, DMs) records Slack's `ts` in
  `slack_messages` (and when: `posted_at`) in the transaction that marks the
  row sent. A later update of that key edits that message; a retried post
  whose key is already recorded is not sent again.

What no outbox can promise: when Slack received a post but the answer never
came back (a timeout, a crash between Slack's answer and our commit), the
post is retried and may appear twice. Updates are idempotent, so only posts
are affected; docs/reliability.md says so.

A post may name other messages by key, resolved when it is sent (a row is
written before those messages exist in Slack): `thread_key` posts it as a
reply in that message's thread (the escalation reminder under its card), and
`link_key` appends that message's permalink (`chat.getPermalink`; the DM to a
fallback approver). While the named message's own post is still pending, the
row waits for it; a message that was never posted is left out (the post goes
to the channel, without the link).

Follow-ups (`jobs`: kind -> function) are rows whose delivery is more database
work rather than a Slack call: the rest of a revocation pass that ended
thousands of grants at once (`reconcile.follow_up`: the DM and card edits, the
reviews), written due a little later because the pass's own process runs them
first. A job gets its row's id and marks the row done (`finish_job`) in its own
transaction, as its first statement: a job that committed is never run again,
one that did not is retried, and never dead-lettered (it is the rest of what
the database already decided). The dispatcher records an outcome only for a
row still pending, so a job's own "done" is never overwritten, nor another
process's dead letter. Follow-ups that a replica of an older version
dead-lettered as an unknown kind (during a rolling upgrade) are queued again
when the dispatcher starts and every minute after.

Token DMs (`token_dm`) hold no token: the dispatcher asks `materialise`
for the text at send time, and the token is minted then. Rows queued
unrendered (`render_row` edits, `render_post_row` posts: payload `render`) are
made by `materialise` at send time too, from the state as it stands then.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import and_, bindparam, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import TextClause

from .. import metrics
from ..core.clock import Clock
from ..store.db import Database
from ..store.schema import not_indexed, outbox, slack_messages
from ..store.sqlite_driver import LockedError, stored_datetime
from ..store.times import aware as _aware

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=30)  # default when the client's timeout is unknown
LEASE_MARGIN = timedelta(seconds=5)  # beyond the Slack client's own timeout
BATCH_PER_LANE = 20
REQUEUE_EVERY = 60.0  # seconds between looks for follow-ups an older version dead-lettered
# pg_advisory_xact_lock key that serialises claims on PostgreSQL (b"bg-outbx").
ADVISORY_LOCK_ID = 0x62672D6F75746278

# ok:false errors that no retry will fix.
PERMANENT_ERRORS = frozenset(
    {
        "channel_not_found", "not_in_channel", "is_archived", "invalid_auth", "account_inactive",
        "token_revoked", "token_expired", "no_permission", "missing_scope", "message_not_found",
        "cant_update_message", "edit_window_closed", "invalid_blocks", "invalid_blocks_format",
        "msg_too_long", "no_text", "too_many_attachments", "user_not_found", "invalid_arguments",
        "not_authed", "cannot_dm_bot", "unknown_method", "method_deprecated", "restricted_action",
        "channel_is_archived", "team_access_not_granted", "ekm_access_denied",
    }
)


# `Dispatcher._due`: the lanes with pending rows, one step each through
# `ix_outbox_pending_lane` (a loose index scan: the next lane after the last one), then
# each lane's first `:n` pending rows by the same index. The literal 'pending' (not a
# parameter) is what lets SQLite use the partial index, and SQLite is told to (`INDEXED
# BY`: without table statistics it would rather walk `ix_outbox_status_next`, every
# pending row, for each lane). SQLite has no LATERAL: there each lane's first ids are
# found by the index, then those rows by primary key.
_DUE_COLUMNS = (outbox.c.id, outbox.c.lane, outbox.c.kind, outbox.c.payload, outbox.c.attempts,
                outbox.c.next_attempt_at)
_DUE_SQL: dict[str, TextClause] = {
    "sqlite": text("""
WITH RECURSIVE lanes(lane) AS (
    SELECT (SELECT o.lane FROM outbox AS o INDEXED BY ix_outbox_pending_lane
            WHERE o.status = 'pending' ORDER BY o.lane LIMIT 1)
    UNION ALL
    SELECT (SELECT o.lane FROM outbox AS o INDEXED BY ix_outbox_pending_lane
            WHERE o.status = 'pending' AND o.lane > lanes.lane ORDER BY o.lane LIMIT 1)
    FROM lanes WHERE lanes.lane IS NOT NULL
)
SELECT h.id, h.lane, h.kind, h.payload, h.attempts, h.next_attempt_at
FROM lanes JOIN outbox AS h ON h.id IN (
    SELECT p.id FROM outbox AS p INDEXED BY ix_outbox_pending_lane
    WHERE p.status = 'pending' AND p.lane = lanes.lane ORDER BY p.id LIMIT :n)
ORDER BY h.lane, h.id
""").columns(*_DUE_COLUMNS),
    "postgresql": text("""
WITH RECURSIVE lanes(lane) AS (
    SELECT (SELECT o.lane FROM outbox AS o
            WHERE o.status = 'pending' ORDER BY o.lane LIMIT 1)
    UNION ALL
    SELECT (SELECT o.lane FROM outbox AS o
            WHERE o.status = 'pending' AND o.lane > lanes.lane ORDER BY o.lane LIMIT 1)
    FROM lanes WHERE lanes.lane IS NOT NULL
)
SELECT h.id, h.lane, h.kind, h.payload, h.attempts, h.next_attempt_at
FROM lanes CROSS JOIN LATERAL (
    SELECT p.id, p.lane, p.kind, p.payload, p.attempts, p.next_attempt_at FROM outbox AS p
    WHERE p.status = 'pending' AND p.lane = lanes.lane ORDER BY p.id LIMIT :n) AS h
ORDER BY h.lane, h.id
""").columns(*_DUE_COLUMNS),
}

@dataclass(frozen=True)
class Rendered:
    text: str
    blocks: list[dict[str, Any]] | None = None


Materialise = Callable[[dict[str, Any]], Awaitable[Rendered | None]]


def row(now: datetime, *, lane: str, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """One outbox row, for `enqueue_many`."""
    return {
        "lane": lane,
        "kind": kind,
        "payload": json.dumps(payload, separators=(",", ":")),
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


def post_row(now: datetime, channel: str, text: str, blocks: list[dict[str, Any]] | None = None,
             key: str | None = None, lane: str | None = None, *, thread_key: str | None = None,
             link_key: str | None = None, link_text: str = "Open it in Slack") -> dict[str, Any]:
    """A post; `thread_key` / `link_key`: see the module docstring."""
    payload: dict[str, Any] = {"channel": channel, "text": text, "blocks": blocks, "key": key}
    if thread_key:
        payload["thread_key"] = thread_key
    if link_key:
        payload["link_key"] = link_key
        payload["link_text"] = link_text
    return row(now, lane=lane or channel, kind="post", payload=payload)


def render_row(now: datetime, key: str, lane: str, render: str, **payload: Any) -> dict[str, Any]:
    """An edit of the message `key` whose text is made when it is sent: the dispatcher
    asks `materialise` (payload `render`, e.g. "card"). Cheap to enqueue by the thousand
    (a reload that revokes many grants), and the edit shows the state at send time."""
    return row(now, lane=lane, kind="update", payload={"key": key, "render": render, **payload})


def render_post_row(now: datetime, channel: str, key: str | None, render: str, *,
                    thread_key: str | None = None, **payload: Any) -> dict[str, Any]:
    """A post whose text is made when it is sent (`materialise`, payload `render`), like
    `render_row`'s edits: cheap to enqueue by the thousand (the review threads of a
    reload that revokes many grants). `key` and `thread_key` as in `post_row`."""
    body: dict[str, Any] = {"channel": channel, "key": key, "render": render, **payload}
    if thread_key:
        body["thread_key"] = thread_key
    return row(now, lane=channel, kind="post", payload=body)


def update_row(now: datetime, key: str, lane: str, text: str,
               blocks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return row(now, lane=lane, kind="update", payload={"key": key, "text": text, "blocks": blocks})


async def enqueue_many(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (from `row`, `post_row`, `update_row`) in one statement, in order:
    their ids, and so their order in each lane, follow the list."""
    if not rows:
        return
    if conn.dialect.name == "sqlite" and len(rows) > 1 and all(r.keys() == _ROW_KEYS for r in rows):
        # Written directly in SQLAlchemy's SQLite storage format (as audit.append_many
        # does): skips its per-row bind processing, which a reload's thousands of rows
        # would otherwise pay for.
        await conn.exec_driver_sql(_INSERT_SQLITE, [
            (r["lane"], r["kind"], r["payload"], r["status"], r["attempts"],
             stored_datetime(r["next_attempt_at"]), stored_datetime(r["created_at"])) for r in rows])
        return
    await conn.execute(insert(outbox), list(rows) if len(rows) > 1 else rows[0])


async def enqueue_returning_ids(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert `rows` (from `row`) in one statement; their ids, in order (follow-ups',
    for `finish_job`)."""
    if not rows:
        return []
    result = await conn.execute(
        insert(outbox).returning(outbox.c.id, sort_by_parameter_order=True), list(rows))
    return [int(i) for i in result.scalars()]


_ROW_KEYS = {"lane": 0, "kind": 0, "payload": 0, "status": 0, "attempts": 0,
             "next_attempt_at": 0, "created_at": 0}.keys()
_INSERT_SQLITE = ("INSERT INTO outbox (lane, kind, payload, status, attempts, next_attempt_at, "
                  "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)")


async def enqueue(
    conn: AsyncConnection, now: datetime, *, lane: str, kind: str, payload: dict[str, Any]
) -> None:
    await enqueue_many(conn, [row(now, lane=lane, kind=kind, payload=payload)])


def post(conn: AsyncConnection, now: datetime, channel: str, text: str,
         blocks: list[dict[str, Any]] | None = None, key: str | None = None,
         lane: str | None = None) -> Awaitable[None]:
    return enqueue(conn, now, lane=lane or channel, kind="post",
                   payload={"channel": channel, "text": text, "blocks": blocks, "key": key})


def update_message(conn: AsyncConnection, now: datetime, key: str, lane: str, text: str,
                   blocks: list[dict[str, Any]] | None = None) -> Awaitable[None]:
    return enqueue(conn, now, lane=lane, kind="update",
                   payload={"key": key, "text": text, "blocks": blocks})


class Retry(Exception):
    """A delivery failed and may succeed later: `after` seconds (else the backoff);
    `paced`: the receiver is pacing us (a 429), which does not use up an attempt."""

    def __init__(self, reason: str, after: float | None = None, *, paced: bool = False) -> None:
        super().__init__(reason)
        self.after = after
        self.paced = paced


class Dead(Exception):
    """A delivery no retry will fix: dead-letter the row now."""


_Retry, _Dead = Retry, Dead

# Delivers one row of another channel's kind (e.g. "webhook"); raises Retry or Dead.
Sender = Callable[[dict[str, Any]], Awaitable[None]]
# Does one follow-up row's database work (payload, row id); see `finish_job`.
Job = Callable[[dict[str, Any], int], Awaitable[None]]


async def finish_job(conn: AsyncConnection, row_id: int, now: datetime) -> bool:
    """In a job's transaction, first: mark its row done. False when it is done already
    (another process ran it): the job then does nothing."""
    result = await conn.execute(
        update(outbox).where(and_(outbox.c.id == row_id, outbox.c.status == "pending"))
        .values(status="sent", sent_at=now, last_error=None))
    return bool(result.rowcount)


class Outcome(enum.Enum):
    SENT = "sent"
    DEAD = "dead"  # the lane may go on
    RETRY = "retry"  # the lane waits for this row


@dataclass
class _Done:
    """A delivered (or dead) row waiting for its outcome to be recorded."""

    row: dict[str, Any]
    status: str
    error: str | None
    posted: tuple[str, str, str] | None
    rest: list[int]
    fut: asyncio.Future[None]


class Dispatcher:
    """Delivers outbox rows (see the module docstring).

    Database work per round, kept small because each statement costs:

    * A round starts with a read-only look for due rows (no write lock when nothing is
      due), except after a `wake` (or a round that left work due at once): then
      something is due, and the claim transaction looks for itself.
    * The claim also reads which of the claimed rows' message keys are already
      recorded in `slack_messages`; a keyed post at the head of its lane, sent right
      after the claim, trusts that answer instead of asking again.
    * Outcomes of concurrent lanes are recorded together (a group commit): a lane
      still waits until its row is recorded before it sends the next one, so what a
      crash can lose is what it could lose before.
    """

    def __init__(
        self,
        db: Database,
        client: AsyncWebClient,
        clock: Clock,
        materialise: Materialise,
        *,
        max_attempts: int = 8,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        poll_interval: float = 0.5,
        lease: float | None = None,
        yield_to: Callable[[], Awaitable[None]] | None = None,
        hold: Callable[[], Awaitable[None]] | None = None,
        senders: dict[str, Sender] | None = None,
        jobs: dict[str, Job] | None = None,
    ) -> None:
        self.db = db
        self.senders = dict(senders or {})  # kind -> sender, for rows that are not Slack's
        self.jobs = dict(jobs or {})  # kind -> follow-up (database work, no Slack call)
        self.client = client
        self.clock = clock
        self.materialise = materialise
        self.max_attempts = max(1, max_attempts)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.poll_interval = poll_interval
        self.lease = timedelta(seconds=lease) if lease is not None else _lease_for(client)
        self.yield_to = yield_to  # awaited before each claim (e.g. while Slack acks are served)
        # Awaited before each claim and each row: returns at once unless a revocation pass
        # runs (foreground.Passes), which then has the loop first.
        self.hold = hold
        self._wake = asyncio.Event()
        self._next_due: datetime | None = None
        self._dirty = True  # something may be due: the next round claims without a look first
        self._again = False  # the last round left work that may be due at once
        self._seen_pending = -1  # pending rows the last look or claim saw (-1: not known)
        self._round = asyncio.Lock()  # one round at a time in this process (run loop, drain)
        # This round: message keys known to be recorded, and those not recorded at claim time.
        self._known: dict[str, tuple[str, str]] = {}
        self._absent: set[str] = set()
        self._done: list[_Done] = []
        self._recorder: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._dirty = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        requeued_at = -REQUEUE_EVERY
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if self.jobs and loop.time() - requeued_at >= REQUEUE_EVERY:
                requeued_at = loop.time()
                with contextlib.suppress(Exception):  # the next round tries again
                    await self._requeue_unknown_jobs()
            self._wake.clear()  # before the round: a wake during it starts another
            try:
                busy = await self.deliver_once()
            except Exception:  # noqa: BLE001 - the loop must survive a bad round
                log.exception("outbox round failed")
                busy = 0
            if busy and self._again:
                continue
            # Otherwise nothing is due at once: new rows come with a wake (or, from another
            # process, by the poll), backoffs and leases end at _next_due.
            await self._sleep(stop)

    async def _sleep(self, stop: asyncio.Event) -> None:
        timeout = self.poll_interval
        if self._next_due is not None:
            until = (self._next_due - self.clock.now()).total_seconds()
            timeout = min(timeout, max(0.005, until))
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _requeue_unknown_jobs(self) -> None:
        """Follow-ups a process of an older version dead-lettered as an unknown kind
        (a rolling upgrade): nothing of them ran, so they are queued again."""
        async with self.db.transaction() as conn:
            result = await conn.execute(
                update(outbox).where(and_(
                    outbox.c.status == "dead", outbox.c.kind.in_(sorted(self.jobs)),
                    outbox.c.last_error.like("unknown outbox kind%")))
                .values(status="pending", attempts=0, next_attempt_at=self.clock.now(),
                        last_error=None, sent_at=None))
        if result.rowcount:
            log.warning("%d follow-up(s) dead-lettered by an older version queued again",
                        result.rowcount)

    async def drain(self, timeout: float) -> int:
        """Deliver what is due until nothing is left or `timeout` passes; returns what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                # A hung Slack call must not stretch a shutdown past its budget: what is
                # cut short stays leased and goes out after the lease, from the next start.
                claimed = await asyncio.wait_for(self.deliver_once(), deadline - loop.time())
            except TimeoutError:
                # What was sent before the cut is being recorded: let that finish.
                recorder = self._recorder
                if recorder is not None and not recorder.done():
                    await asyncio.wait([recorder], timeout=1.0)
                break
            if claimed == 0 and self._seen_pending == 0:
                return 0  # the round's own look found no pending row at all
            pause = 0.05
            if self._next_due is not None:
                pause = min(0.05, max(0.005, (self._next_due - self.clock.now()).total_seconds()))
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
        return await self.pending_count()

    async def pending_count(self) -> int:
        async with self.db.read() as conn:
            n = await conn.scalar(select(func.count()).where(outbox.c.status == "pending"))
        return int(n or 0)

    async def deliver_once(self) -> int:
        """One round: claim what is due in every lane and deliver it; returns rows claimed."""
        async with self._round:
            self._again = False
            lanes = await self._claim()
            if not lanes:
                return 0
            results = await asyncio.gather(*(self._deliver_lane(rows) for rows in lanes),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    # The database's own error (it never holds token text); cut short.
                    log.error("outbox lane failed: %s: %s", type(result).__name__,
                              str(result)[:300])
                    self._again = True
            if any(len(rows) >= BATCH_PER_LANE for rows in lanes):
                self._again = True  # a lane may hold more than one claim takes
            if self._again:
                self._dirty = True
            return sum(len(rows) for rows in lanes)

    async def _claim(self) -> list[list[dict[str, Any]]]:
        if self.hold is not None:
            await self.hold()
        now = self.clock.now()
        look, self._dirty = not self._dirty, False
        if look:
            # Idle rounds only read: no write lock unless something is due.
            async with self.db.read() as conn:
                by_lane, next_due, seen = await self._due(conn, now)
            self._seen_pending = seen
            if not by_lane:
                self._next_due = next_due
                return []
        if self.yield_to is not None:
            await self.yield_to()
            now = self.clock.now()
        async with self.db.transaction() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_ID})
            by_lane, next_due, seen = await self._due(conn, now)  # again, under the lock
            ids = [r["id"] for rs in by_lane.values() for r in rs]
            self._known, self._absent = {}, set()
            if ids:
                await conn.execute(
                    update(outbox)
                    .where(and_(outbox.c.id.in_(ids), not_indexed(outbox.c.status) == "pending"))
                    .values(next_attempt_at=now + self.lease, attempts=outbox.c.attempts + 1)
                )
                keys = {k for rs in by_lane.values() for r in rs if (k := _key_of(r["payload"]))}
                if keys:
                    found = (await conn.execute(
                        select(slack_messages.c.key, slack_messages.c.channel, slack_messages.c.ts)
                        .where(slack_messages.c.key.in_(sorted(keys))))).all()
                    self._known = {k: (c, t) for k, c, t in found}
                    self._absent = keys - set(self._known)
        self._seen_pending = seen
        self._next_due = next_due
        return [rs for rs in by_lane.values() if rs]

    @staticmethod
    async def _due(conn: AsyncConnection, now: datetime
                   ) -> tuple[dict[str, list[dict[str, Any]]], datetime | None, int]:
        """The first rows of every lane that are due, up to BATCH_PER_LANE, in order; when
        the first row that is not due is; and how many pending rows were looked at (each
        lane's first BATCH_PER_LANE pending rows, 0 when nothing is pending).

        Through `ix_outbox_pending_lane` only: one step from each lane with pending rows
        to the next, then each lane's first rows, so the cost follows the lanes, not the
        pending rows (a large revocation pass or a long Slack outage leaves tens of
        thousands; SQLite runs on the event loop)."""
        rows = (await conn.execute(
            _DUE_SQL[conn.dialect.name], {"n": BATCH_PER_LANE})).mappings().all()
        by_lane: dict[str, list[dict[str, Any]]] = {}
        blocked: set[str] = set()
        next_due: datetime | None = None
        for row in rows:
            lane = row["lane"]
            if lane in blocked:
                continue
            due = _aware(row["next_attempt_at"])
            # A row that is not due (backoff, or leased by someone) holds its lane.
            if due > now:
                blocked.add(lane)
                next_due = due if next_due is None else min(next_due, due)
                continue
            by_lane.setdefault(lane, []).append(
                {k: row[k] for k in ("id", "lane", "kind", "payload", "attempts")})
        return by_lane, next_due, len(rows)

    async def _deliver_lane(self, rows: list[dict[str, Any]]) -> None:
        for i, row in enumerate(rows):
            if self.hold is not None:
                await self.hold()
            rest = [r["id"] for r in rows[i + 1:]]
            outcome = await self._deliver(row, rest, fresh=i == 0)
            if outcome is not Outcome.SENT:
                self._again = True  # a retry or dead letter changes what is due when
            if outcome is Outcome.RETRY:
                # Keep order: release the rest of this lane's claim untouched.
                if rest:
                    async with self.db.transaction() as conn:
                        await conn.execute(
                            update(outbox)
                            .where(and_(outbox.c.id.in_(rest),
                                        not_indexed(outbox.c.status) == "pending"))
                            .values(next_attempt_at=self.clock.now(),
                                    attempts=outbox.c.attempts - 1)
                        )
                return

    async def _deliver(self, row: dict[str, Any], rest: Sequence[int] = (), *,
                       fresh: bool = False) -> Outcome:
        """`fresh`: the row is the first of its lane in this round, so what the claim read
        about its message key is still current."""
        attempts = int(row["attempts"]) + 1  # this attempt, as counted by the claim
        kind = row["kind"]
        try:
            payload = json.loads(row["payload"])
        except ValueError:
            payload = None
        try:
            if not isinstance(payload, dict):
                raise _Dead("payload is not a JSON object")
            posted = await self._send(kind, payload, int(row["id"]), fresh)
        except _Dead as exc:
            await self._dead(row, attempts, str(exc), rest)
            return Outcome.DEAD
        except _Retry as exc:
            if not exc.paced and attempts >= self.max_attempts:
                await self._dead(row, attempts, f"gave up after {attempts} attempts: {exc}", rest)
                return Outcome.DEAD
            if exc.after is not None:
                delay = min(self.max_delay, max(0.0, exc.after))
            else:
                delay = self._backoff(attempts)
            await self._reschedule(row, delay, str(exc), refund=exc.paced)
            metrics.OUTBOX_RETRIES.labels(kind=kind).inc()
            log.warning("outbox event %s (%s, lane %s) will retry in %.2fs (attempt %d of %d): %s",
                        row["id"], kind, row["lane"], delay, attempts, self.max_attempts, exc)
            return Outcome.RETRY
        except Exception as exc:  # noqa: BLE001 - e.g. the database under the materialiser
            # Never log str(exc) here: the materialiser holds token text.
            if kind in self.jobs:
                # A follow-up is the rest of what the database already decided (the
                # reviews of revoked grants): it is never given up, only retried.
                delay = self._backoff(attempts)
                await self._reschedule(row, delay, type(exc).__name__)
                metrics.OUTBOX_RETRIES.labels(kind=kind).inc()
                (log.error if attempts >= self.max_attempts else log.warning)(
                    "outbox follow-up %s (%s) failed with %s (attempt %d); retry in %.2fs",
                    row["id"], kind, type(exc).__name__, attempts, delay)
                return Outcome.RETRY
            if attempts >= self.max_attempts:
                await self._dead(row, attempts, f"gave up after {attempts} attempts: "
                                 f"{type(exc).__name__}", rest)
                return Outcome.DEAD
            delay = self._backoff(attempts)
            await self._reschedule(row, delay, type(exc).__name__)
            metrics.OUTBOX_RETRIES.labels(kind=kind).inc()
            log.warning("outbox event %s (%s) failed with %s; retry in %.2fs",
                        row["id"], kind, type(exc).__name__, delay)
            return Outcome.RETRY
        await self._finish(row, "sent", None, posted, rest)
        metrics.OUTBOX_SENT.labels(kind=kind).inc()
        return Outcome.SENT

    async def _dead(self, row: dict[str, Any], attempts: int, error: str, rest: Sequence[int]) -> None:
        await self._finish(row, "dead", error, None, rest)
        metrics.OUTBOX_DEAD.labels(kind=row["kind"]).inc()
        log.error("outbox event %s (%s, lane %s) dead-lettered after %d attempt(s): %s; "
                  "`breakglass outbox retry` queues it again", row["id"], row["kind"], row["lane"],
                  attempts, error)

    def _backoff(self, attempts: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2 ** min(attempts - 1, 60))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto

    async def _send(self, kind: str, p: dict[str, Any], row_id: int,
                    fresh: bool = False) -> tuple[str, str, str] | None:
        """Do the Slack call; returns (key, channel, ts) for a keyed post."""
        sender = self.senders.get(kind)
        if sender is not None:
            await sender(p)
            return None
        job = self.jobs.get(kind)
        if job is not None:
            await job(p, row_id)
            return None
        if kind == "post":
            key = p.get("key")
            if key and await self._recorded(key, fresh):
                return None  # posted before a crash: never post twice
            text, post_blocks = p.get("text"), p.get("blocks")
            if p.get("render"):  # queued unrendered (`render_post_row`): made now
                rendered = await self.materialise(p)
                if rendered is None:
                    return None  # nothing to say any more
                text, post_blocks = rendered.text, rendered.blocks
            thread_ts = None
            if p.get("thread_key"):
                where = await self._named(p["thread_key"], row_id)
                thread_ts = where[1] if where else None
            if p.get("link_key"):
                where = await self._named(p["link_key"], row_id)
                if where is not None:
                    link = await self._call("chat_getPermalink", channel=where[0],
                                            message_ts=where[1])
                    text = f"{text}\n<{link['permalink']}|{p.get('link_text') or 'Open it'}>"
            resp = await self._call("chat_postMessage", channel=p["channel"], text=text,
                                    blocks=post_blocks, thread_ts=thread_ts,
                                    unfurl_links=False, unfurl_media=False)
            if key:
                return key, str(resp["channel"]), str(resp["ts"])
            return None
        if kind == "update":
            where = await self._recorded(p["key"], False)
            if where is None:
                if await self._post_waiting(p["key"], row_id):
                    raise _Retry(f"the message {p['key']} is not posted yet")
                where = await self._message(p["key"])  # it may have gone out meanwhile
            if where is None:
                raise _Dead(f"no posted message for {p['key']} to update")
            text, edit_blocks = p.get("text"), p.get("blocks")
            if p.get("render"):
                rendered = await self.materialise(p)
                if rendered is None:
                    return None
                text, edit_blocks = rendered.text, rendered.blocks
            await self._call("chat_update", channel=where[0], ts=where[1], text=text,
                             blocks=edit_blocks or [])
            return None
        if kind == "token_dm":
            if await self._recorded(p["key"], fresh):
                return None
            rendered = await self.materialise(p)
            if rendered is None:
                return None  # the grant ended before delivery: nothing to send
            resp = await self._call("chat_postMessage", channel=p["user"], text=rendered.text,
                                    blocks=rendered.blocks, unfurl_links=False, unfurl_media=False)
            return p["key"], str(resp["channel"]), str(resp["ts"])
        raise _Dead(f"unknown outbox kind {kind!r}")

    async def _named(self, key: Any, row_id: int) -> tuple[str, str] | None:
        """(channel, ts) of the message `key` that a post refers to; waits (a retry) while
        that message's own post is pending; None when it was never posted."""
        if not isinstance(key, str):
            return None
        where = await self._recorded(key, False)
        if where is None:
            if await self._post_waiting(key, row_id):
                raise _Retry(f"the message {key} is not posted yet")
            where = await self._message(key)  # it may have gone out meanwhile
        return where

    async def _recorded(self, key: Any, fresh: bool) -> tuple[str, str] | None:
        """Where the message `key` was posted, if it was. A recorded key never changes, so
        what this round learnt stands; "not recorded" is trusted only while `fresh`."""
        if not isinstance(key, str):
            return await self._message(key)
        where = self._known.get(key)
        if where is not None:
            return where
        if fresh and key in self._absent:
            return None
        return await self._message(key)

    async def _call(self, method: str, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return await getattr(self.client, method)(**kwargs)
        except SlackApiError as exc:
            status = exc.response.status_code
            data = exc.response.data
            error = data.get("error") if isinstance(data, dict) else None
            if status == 429:
                raise _Retry("rate limited (429)", _retry_after(exc.response.headers),
                              paced=True) from None
            if status != 200:
                raise _Retry(f"HTTP {status}") from None
            if error == "ratelimited":
                raise _Retry("rate limited", _retry_after(exc.response.headers), paced=True) from None
            if error in PERMANENT_ERRORS:
                raise _Dead(f"Slack said {error}") from None
            raise _Retry(f"Slack said {error}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Retry(type(exc).__name__) from None

    async def _message(self, key: str) -> tuple[str, str] | None:
        async with self.db.read() as conn:
            row = (await conn.execute(
                select(slack_messages.c.channel, slack_messages.c.ts)
                .where(slack_messages.c.key == key))).first()
        return (row[0], row[1]) if row else None

    async def _post_waiting(self, key: str, before: int) -> bool:
        """Is a post of `key` still pending (e.g. in another lane after a policy change)?"""
        needle = '"key":' + json.dumps(key)  # as enqueue() writes it (compact JSON)
        escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        async with self.db.read() as conn:
            n = await conn.scalar(
                select(func.count()).where(and_(
                    outbox.c.status == "pending", outbox.c.id < before,
                    outbox.c.kind.in_(["post", "token_dm"]),
                    outbox.c.payload.like(f"%{escaped}%", escape="\\"))))
        return bool(n)

    async def _finish(self, row: dict[str, Any], status: str, error: str | None,
                      posted: tuple[str, str, str] | None = None, rest: Sequence[int] = ()) -> None:
        """Mark the row done and renew the lease on the rest of its lane's claim; return
        once that is committed.

        Rows finished by concurrent lanes are recorded in one transaction (see
        `_record_all`). After a send this must not be lost (a lost 'sent' means a second
        post), so a failing commit is tried again for a few seconds; and it goes on even
        if the lane waiting for it is cancelled.
        """
        done = _Done(row, status, error, posted, list(rest),
                     asyncio.get_running_loop().create_future())
        self._done.append(done)
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_all())
        await done.fut

    async def _record_all(self) -> None:
        batch: list[_Done] = []
        try:
            while self._done:
                batch, self._done = self._done, []
                try:
                    await self._record(batch)
                except Exception as exc:  # noqa: BLE001 - each waiting lane hears about it
                    for d in batch:
                        if not d.fut.done():
                            d.fut.set_exception(exc)
                    continue
                for d in batch:
                    if not d.fut.done():
                        d.fut.set_result(None)
        finally:
            for d in (*batch, *self._done):  # cancelled (the loop is closing): not recorded
                if not d.fut.done():
                    d.fut.cancel()

    async def _record(self, batch: list[_Done]) -> None:
        for attempt in range(5):
            try:
                await self._record_once(batch)
                return
            except (DBAPIError, LockedError):
                if attempt == 4:
                    raise
                log.warning("outbox event(s) %s: could not record %s yet; trying again",
                            ", ".join(str(d.row["id"]) for d in batch),
                            "/".join(sorted({d.status for d in batch})))
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _record_once(self, batch: list[_Done]) -> None:
        now = self.clock.now()
        sent = [d.row["id"] for d in batch if d.status == "sent" and d.error is None]
        others = [d for d in batch if not (d.status == "sent" and d.error is None)]
        posted: dict[str, tuple[str, str]] = {}
        for d in batch:
            if d.posted:
                posted.setdefault(d.posted[0], (d.posted[1], d.posted[2]))
        rest = sorted({i for d in batch for i in d.rest})
        # Only a row still pending: a follow-up (`jobs`) marks its own row done in its
        # transaction, and a row another process dead-lettered stays dead.
        async with self.db.transaction() as conn:
            if sent:
                await conn.execute(
                    update(outbox)
                    .where(and_(outbox.c.id.in_(sent), not_indexed(outbox.c.status) == "pending"))
                    .values(status="sent", sent_at=now, last_error=None))
            if others:
                await conn.execute(
                    update(outbox)
                    .where(and_(outbox.c.id == bindparam("b_id"), outbox.c.status == "pending"))
                    .values(status=bindparam("b_status"), sent_at=bindparam("b_at"),
                            last_error=bindparam("b_error")),
                    [{"b_id": d.row["id"], "b_status": d.status, "b_at": now, "b_error": d.error}
                     for d in others])
            inserted = await _record_posts(conn, posted, now)
            if rest:
                await conn.execute(
                    update(outbox)
                    .where(and_(outbox.c.id.in_(rest), not_indexed(outbox.c.status) == "pending"))
                    .values(next_attempt_at=now + self.lease))
        self._known.update({k: posted[k] for k in inserted})

    async def _reschedule(self, row: dict[str, Any], delay: float, error: str,
                          refund: bool = False) -> None:
        values: dict[str, Any] = {
            "next_attempt_at": self.clock.now() + timedelta(seconds=delay),
            "last_error": error[:500],
        }
        if refund:
            values["attempts"] = outbox.c.attempts - 1
        async with self.db.transaction() as conn:
            await conn.execute(
                update(outbox).where(and_(outbox.c.id == row["id"], outbox.c.status == "pending"))
                .values(**values)
            )


async def retry_dead(db: Database, now: datetime, ids: Sequence[int] | None = None) -> int:
    """`breakglass outbox retry`: give dead-lettered rows (all, or `ids`) a fresh set of attempts.

    They keep their ids, so each goes back to its place in its lane's order.
    """
    where = outbox.c.status == "dead"
    if ids is not None:
        where = and_(where, outbox.c.id.in_(list(ids)))
    async with db.transaction() as conn:
        result = await conn.execute(
            update(outbox).where(where)
            .values(status="pending", attempts=0, next_attempt_at=now, last_error=None,
                    sent_at=None)
        )
    n = int(result.rowcount or 0)
    if n:
        log.info("%d dead-lettered outbox event(s) queued again", n)
    return n


async def dead_letters(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    """Dead-lettered rows, oldest first: id, lane, kind, attempts, created_at, last_error."""
    c = outbox.c
    async with db.read() as conn:
        rows = (await conn.execute(
            select(c.id, c.lane, c.kind, c.attempts, c.created_at, c.sent_at, c.last_error)
            .where(c.status == "dead").order_by(c.id).limit(limit))).mappings().all()
    return [dict(r) for r in rows]


async def counts(db: Database) -> dict[str, int]:
    """Rows by status: {"pending": n, "sent": n, "dead": n}."""
    async with db.read() as conn:
        rows = (await conn.execute(
            select(outbox.c.status, func.count()).group_by(outbox.c.status))).all()
    out = {"pending": 0, "sent": 0, "dead": 0}
    out.update({str(s): int(n) for s, n in rows})
    return out


async def _record_posts(conn: AsyncConnection, posted: dict[str, tuple[str, str]],
                        now: datetime) -> set[str]:
    """Record (channel, ts) of posted message keys, and when (`posted_at`: a drill's card
    time); a key already recorded keeps its first record. Returns the keys recorded here
    (when the database can say: else none)."""
    if not posted:
        return set()
    rows = [{"key": k, "channel": c, "ts": t, "posted_at": now} for k, (c, t) in posted.items()]
    name = conn.dialect.name
    if name in ("sqlite", "postgresql"):
        insert_ = sqlite_insert if name == "sqlite" else pg_insert
        stmt = insert_(slack_messages).on_conflict_do_nothing(index_elements=["key"])
        dialect = conn.dialect
        if dialect.insert_returning and (len(rows) == 1 or dialect.insert_executemany_returning):
            result = await conn.execute(stmt.returning(slack_messages.c.key),
                                        rows if len(rows) > 1 else rows[0])
            return set(result.scalars())
        await conn.execute(stmt, rows if len(rows) > 1 else rows[0])
        return set()
    inserted = set()
    for r in rows:
        exists = await conn.scalar(select(func.count()).where(slack_messages.c.key == r["key"]))
        if not exists:
            await conn.execute(insert(slack_messages).values(**r))
            inserted.add(r["key"])
    return inserted


def _key_of(payload: Any) -> str | None:
    """The message key a row's payload names, if any."""
    try:
        p = json.loads(payload)
    except (TypeError, ValueError):
        return None
    key = p.get("key") if isinstance(p, dict) else None
    return key if isinstance(key, str) and key else None


def _retry_after(headers: Any) -> float:
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        value = float(str(headers.get("Retry-After", "1")).strip())
        if value == value and value >= 0:  # not NaN
            return value
    return 1.0


def _lease_for(client: Any) -> timedelta:
    timeout = getattr(client, "timeout", None)
    if isinstance(timeout, int | float) and timeout > 0:
        return timedelta(seconds=float(timeout)) + LEASE_MARGIN
    return LEASE
