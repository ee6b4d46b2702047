"""The one way out to Slack for events.

A use case writes outbox rows in the same transaction as its state change
(`enqueue`); the `Dispatcher` delivers them. Delivery keeps order per lane
(one lane per channel), retries with exponential backoff and jitter, honours
429 Retry-After, and dead-letters after `max_attempts`. Rows are claimed with
a lease, so two processes never send the same row at once. A post that
carries a `key` records Slack's `ts` in `slack_messages`, which later updates
use, so a retry updates instead of posting again.

Token DMs (`token_dm`) hold no token: the dispatcher asks `materialise`
for the text at send time, and the token is minted then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from . import metrics
from .core.clock import Clock
from .store.db import Database
from .store.schema import outbox, slack_messages

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=30)
BATCH_PER_LANE = 20

# ok:false errors that no retry will fix.
PERMANENT_ERRORS = frozenset(
    {
        "channel_not_found", "not_in_channel", "is_archived", "invalid_auth", "account_inactive",
        "token_revoked", "no_permission", "missing_scope", "message_not_found",
        "cant_update_message", "invalid_blocks", "msg_too_long", "user_not_found",
        "invalid_arguments", "not_authed", "cannot_dm_bot", "unknown_method",
    }
)


@dataclass(frozen=True)
class Rendered:
    text: str
    blocks: list[dict[str, Any]] | None = None


Materialise = Callable[[dict[str, Any]], Awaitable[Rendered | None]]


async def enqueue(
    conn: AsyncConnection, now: datetime, *, lane: str, kind: str, payload: dict[str, Any]
) -> None:
    await conn.execute(
        insert(outbox).values(
            lane=lane,
            kind=kind,
            payload=json.dumps(payload, separators=(",", ":")),
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def post(conn: AsyncConnection, now: datetime, channel: str, text: str,
         blocks: list[dict[str, Any]] | None = None, key: str | None = None,
         lane: str | None = None) -> Awaitable[None]:
    return enqueue(conn, now, lane=lane or channel, kind="post",
                   payload={"channel": channel, "text": text, "blocks": blocks, "key": key})


def update_message(conn: AsyncConnection, now: datetime, key: str, lane: str, text: str,
                   blocks: list[dict[str, Any]] | None = None) -> Awaitable[None]:
    return enqueue(conn, now, lane=lane, kind="update",
                   payload={"key": key, "text": text, "blocks": blocks})


class _Retry(Exception):
    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


class _Dead(Exception):
    pass


class Dispatcher:
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
    ) -> None:
        self.db = db
        self.client = client
        self.clock = clock
        self.materialise = materialise
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                busy = await self.deliver_once()
            except Exception:  # noqa: BLE001 - the loop must survive a bad round
                log.exception("outbox round failed")
                busy = 0
            if busy:
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass

    async def drain(self, timeout: float) -> int:
        """Deliver what is due until nothing is left or `timeout` passes; returns what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self.deliver_once() == 0 and await self.pending_count() == 0:
                return 0
            await asyncio.sleep(0.05)
        return await self.pending_count()

    async def pending_count(self) -> int:
        async with self.db.read() as conn:
            n = await conn.scalar(select(func.count()).where(outbox.c.status == "pending"))
        return int(n or 0)

    async def deliver_once(self) -> int:
        lanes = await self._claim()
        if not lanes:
            return 0
        await asyncio.gather(*(self._deliver_lane(rows) for rows in lanes))
        return sum(len(rows) for rows in lanes)

    async def _claim(self) -> list[list[dict[str, Any]]]:
        now = self.clock.now()
        async with self.db.transaction() as conn:
            rows = (
                await conn.execute(
                    select(outbox).where(outbox.c.status == "pending").order_by(outbox.c.id)
                    .limit(2000)
                )
            ).mappings().all()
            by_lane: dict[str, list[dict[str, Any]]] = {}
            blocked: set[str] = set()
            for row in rows:
                lane = row["lane"]
                if lane in blocked:
                    continue
                # A lane's head that is not due (backoff, or leased elsewhere) holds the lane.
                if _aware(row["next_attempt_at"]) > now:
                    blocked.add(lane)
                    continue
                claimed = by_lane.setdefault(lane, [])
                if len(claimed) >= BATCH_PER_LANE:
                    blocked.add(lane)
                    continue
                claimed.append(dict(row))
            ids = [r["id"] for rs in by_lane.values() for r in rs]
            if ids:
                await conn.execute(
                    update(outbox).where(outbox.c.id.in_(ids))
                    .values(next_attempt_at=now + LEASE, attempts=outbox.c.attempts + 1)
                )
        return [rs for rs in by_lane.values() if rs]

    async def _deliver_lane(self, rows: list[dict[str, Any]]) -> None:
        for i, row in enumerate(rows):
            ok = await self._deliver(row)
            if not ok:
                # Keep order: release the rest of this lane's claim untouched.
                rest = [r["id"] for r in rows[i + 1:]]
                if rest:
                    async with self.db.transaction() as conn:
                        await conn.execute(
                            update(outbox).where(outbox.c.id.in_(rest))
                            .values(next_attempt_at=self.clock.now(),
                                    attempts=outbox.c.attempts - 1)
                        )
                return

    async def _deliver(self, row: dict[str, Any]) -> bool:
        payload = json.loads(row["payload"])
        attempts = int(row["attempts"]) + 1
        try:
            posted = await self._send(row["kind"], payload)
        except _Dead as exc:
            await self._finish(row, "dead", str(exc))
            metrics.OUTBOX_DEAD.labels(kind=row["kind"]).inc()
            log.error("outbox event %s (%s) dead-lettered: %s", row["id"], row["kind"], exc)
            return False
        except _Retry as exc:
            if attempts >= self.max_attempts:
                await self._finish(row, "dead", f"gave up after {attempts} attempts: {exc}")
                metrics.OUTBOX_DEAD.labels(kind=row["kind"]).inc()
                log.error("outbox event %s (%s) dead-lettered after %d attempts: %s",
                          row["id"], row["kind"], attempts, exc)
                return False
            delay = exc.after if exc.after is not None else self._backoff(attempts)
            await self._reschedule(row, delay, str(exc))
            metrics.OUTBOX_RETRIES.labels(kind=row["kind"]).inc()
            log.warning("outbox event %s (%s) will retry in %.1fs: %s",
                        row["id"], row["kind"], delay, exc)
            return False
        await self._finish(row, "sent", None, posted)
        metrics.OUTBOX_SENT.labels(kind=row["kind"]).inc()
        return True

    def _backoff(self, attempts: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempts - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto

    async def _send(self, kind: str, p: dict[str, Any]) -> tuple[str, str, str] | None:
        """Do the Slack call; returns (key, channel, ts) for a keyed post."""
        if kind == "post":
            if p.get("key") and await self._message(p["key"]):
                return None  # posted before a crash: never post twice
            resp = await self._call("chat_postMessage", channel=p["channel"], text=p["text"],
                                    blocks=p.get("blocks"), unfurl_links=False)
            if p.get("key"):
                return p["key"], str(resp["channel"]), str(resp["ts"])
            return None
        if kind == "update":
            where = await self._message(p["key"])
            if where is None:
                raise _Dead(f"no posted message for {p['key']} to update")
            await self._call("chat_update", channel=where[0], ts=where[1], text=p["text"],
                             blocks=p.get("blocks") or [])
            return None
        if kind == "token_dm":
            if await self._message(p["key"]):
                return None
            rendered = await self.materialise(p)
            if rendered is None:
                return None  # the grant ended before delivery: nothing to send
            resp = await self._call("chat_postMessage", channel=p["user"], text=rendered.text,
                                    blocks=rendered.blocks)
            return p["key"], str(resp["channel"]), str(resp["ts"])
        raise _Dead(f"unknown outbox kind {kind!r}")

    async def _call(self, method: str, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return await getattr(self.client, method)(**kwargs)
        except SlackApiError as exc:
            status = exc.response.status_code
            error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
            if status == 429:
                after = exc.response.headers.get("Retry-After", "1")
                raise _Retry("rate limited", float(after) if str(after).isdigit() else 1.0) from None
            if status >= 500 or status != 200:
                raise _Retry(f"HTTP {status}") from None
            if error in PERMANENT_ERRORS:
                raise _Dead(f"Slack said {error}") from None
            raise _Retry(f"Slack said {error}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None

    async def _message(self, key: str) -> tuple[str, str] | None:
        async with self.db.read() as conn:
            row = (await conn.execute(
                select(slack_messages.c.channel, slack_messages.c.ts)
                .where(slack_messages.c.key == key))).first()
        return (row[0], row[1]) if row else None

    async def _finish(self, row: dict[str, Any], status: str, error: str | None,
                      posted: tuple[str, str, str] | None = None) -> None:
        now = self.clock.now()
        async with self.db.transaction() as conn:
            await conn.execute(
                update(outbox).where(outbox.c.id == row["id"])
                .values(status=status, sent_at=now, last_error=error)
            )
            if posted:
                key, channel, ts = posted
                exists = await conn.scalar(
                    select(func.count()).where(slack_messages.c.key == key))
                if not exists:
                    await conn.execute(insert(slack_messages).values(key=key, channel=channel, ts=ts))

    async def _reschedule(self, row: dict[str, Any], delay: float, error: str) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(
                update(outbox).where(and_(outbox.c.id == row["id"], outbox.c.status == "pending"))
                .values(next_attempt_at=self.clock.now() + timedelta(seconds=delay),
                        last_error=error)
            )


async def retry_dead(db: Database, now: datetime) -> int:
    """`breakglass outbox retry`: give every dead-lettered row a fresh set of attempts."""
    async with db.transaction() as conn:
        result = await conn.execute(
            update(outbox).where(outbox.c.status == "dead")
            .values(status="pending", attempts=0, next_attempt_at=now, last_error=None)
        )
    return int(result.rowcount or 0)


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)
