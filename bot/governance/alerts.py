"""Raising alerts (contract §7.5).

An alert is three things written together, inside the caller's transaction:

* an incident-channel post starting with `:rotating_light:` (through the outbox);
* an audit row `alert` with details `{"kind", "text", ...figures}`;
* through that audit row, a webhook event `alert` to every webhook listing it
  (`bot/delivery/webhooks.py` hooks the audit log, so nothing more is needed).

Use from a use case that collects its writes (``service.Writes``, or anything with
``events`` and ``rows`` lists)::

    alerts.raise_alert(w, now, channel, alerts.RELOAD_REFUSED,
                       "The policy reload was refused: …", {"errors": [...]})

or, holding only a connection inside a transaction::

    await alerts.raise_alert_in(conn, audit_key, now, channel, kind, text, details)

`text` is mrkdwn: escape anything a person typed (`bot.slack.blocks.escape`).
The rules that decide *when* (thresholds, quiet hours) are pure, in
`bot/core/alerts.py`; `on_request` and `on_uses` apply them to requests and
token uses. Drills count for no threshold: pass ``drill=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import audit
from ..core import alerts as rules
from ..core.alerts import (
    ACTOR,
    ALERT_PREFIX,
    CHECKPOINT_MISMATCH,
    KEY_ROTATED,
    MASTER_KEY_ROTATED,
    QUIET_HOURS,
    RELOAD_REFUSED,
    REQUESTS_PER_DAY,
    REVIEW_OVERDUE,
    USES_PER_MINUTE,
    post_text,
)
from ..core.events import ALERT
from ..core.policy import Policy
from ..delivery import outbox
from ..store import requests as store
from ..store.db import Database
from ..store.schema import alert_counters
from ..store.times import aware

__all__ = [
    "ACTOR", "ALERT_PREFIX", "CHECKPOINT_MISMATCH", "KEY_ROTATED", "MASTER_KEY_ROTATED", "QUIET_HOURS",
    "RELOAD_REFUSED", "REQUESTS_PER_DAY", "REVIEW_OVERDUE", "USES_PER_MINUTE", "Writes",
    "on_request", "on_uses", "prune_use_counters", "post_text", "raise_alert", "raise_alert_in",
]

USES_PREFIX = "uses:"  # alert_counters rows of `on_uses`: one per token ever used
USES_KEEP = timedelta(minutes=10)  # a use counts in its clock minute; a row this old is done


class Writes(Protocol):
    """What a use case's transaction collects (``service.Writes`` is one)."""

    events: list[audit.AuditEvent]
    rows: list[dict[str, Any]]


def _details(kind: str, text: str, details: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**(details or {}), "kind": kind, "text": text}


def raise_alert(w: Writes, now: datetime, channel: str, kind: str, text: str,
                details: Mapping[str, Any] | None = None, request_id: str | None = None,
                key: str | None = None) -> None:
    """Add an alert to the writes of the caller's transaction (see the module docstring).
    `key`: the same alert raised by several processes (a reload every replica refuses)
    is posted once (the outbox posts a keyed message once)."""
    w.events.append(audit.AuditEvent(at=now, actor=ACTOR, event=ALERT,
                                     details=_details(kind, text, details),
                                     request_id=request_id))
    w.rows.append(outbox.post_row(now, channel, post_text(text), key=key))


async def raise_alert_in(conn: AsyncConnection, audit_key: bytes, now: datetime, channel: str,
                         kind: str, text: str, details: Mapping[str, Any] | None = None,
                         request_id: str | None = None) -> None:
    """The same, written at once in `conn`'s transaction (for code without a Writes)."""
    await audit.append(conn, audit_key, at=now, actor=ACTOR, event=ALERT,
                       details=_details(kind, text, details), request_id=request_id)
    await outbox.post(conn, now, channel, post_text(text))


# --------------------------------------------------------------------------- requests


async def on_request(w: Writes, conn: AsyncConnection, policy: Policy, now: datetime, *,
                     request_id: str, requester: str, scope: str, drill: bool = False) -> None:
    """After a request was inserted (in the same transaction): per-day and quiet hours."""
    settings = policy.alerts
    channel = policy.slack.incident_channel
    if settings.max_requests_per_day is not None and not drill:
        today = await _requests_since(conn, requester, now - rules.DAY)
        if rules.over_requests_per_day(today, settings.max_requests_per_day):
            raise_alert(w, now, channel, REQUESTS_PER_DAY,
                        f"<@{requester}> opened {today} break-glass requests in the last 24 "
                        f"hours (the limit is {settings.max_requests_per_day}); the latest is "
                        f"{request_id} for `{scope}`.",
                        {"requester": requester, "count": today,
                         "limit": settings.max_requests_per_day, "scope": scope}, request_id)
    if rules.in_quiet_hours(now, settings.quiet_hours, drill=drill):
        raise_alert(w, now, channel, QUIET_HOURS,
                    f"<@{requester}> requested `{scope}` ({request_id}) during quiet hours "
                    f"({settings.quiet_hours} UTC).",
                    {"requester": requester, "scope": scope, "what": "request",
                     "quiet_hours": str(settings.quiet_hours)}, request_id)


async def _requests_since(conn: AsyncConnection, requester: str, since: datetime) -> int:
    return await store.count_since(conn, requester, since, drill=False)  # drills never count


# --------------------------------------------------------------------------- token uses


async def on_first_use(conn: AsyncConnection, audit_key: bytes, policy: Policy, now: datetime,
                       *, request_id: str, requester: str | None, scope: str | None,
                       client: str, drill: bool = False) -> bool:
    """A token's first use, in the transaction that records it: quiet hours."""
    window = policy.alerts.quiet_hours
    if not rules.in_quiet_hours(now, window, drill=drill):
        return False
    who = f"<@{requester}>'s" if requester else "A"
    await raise_alert_in(conn, audit_key, now, policy.slack.incident_channel, QUIET_HOURS,
                         f"{who} token for `{scope}` ({request_id}) was first used by "
                         f"`{client}` during quiet hours ({window} UTC).",
                         {"scope": scope, "what": "first use", "client": client,
                          "quiet_hours": str(window)}, request_id)
    return True


async def on_uses(conn: AsyncConnection, audit_key: bytes, policy: Policy,
                  uses: Sequence[tuple[str, str, int, datetime]]) -> int:
    """Count uses per token and clock minute, in the transaction that records them:
    `uses` is [(jti, request_id, count, at)]. The use that passes
    `max_uses_per_minute` alerts, once per token and minute. Returns alerts raised."""
    limit = policy.alerts.max_uses_per_minute
    if limit is None or not uses:
        return 0
    raised = 0
    for jti, request_id, n, at in uses:
        minute = at.replace(second=0, microsecond=0)
        key = f"{USES_PREFIX}{jti}"
        row = (await conn.execute(select(alert_counters.c.window_start, alert_counters.c.count)
                                  .where(alert_counters.c.key == key))).first()
        if row is None:
            before = 0
            await conn.execute(alert_counters.insert().values(key=key, window_start=minute,
                                                              count=n))
        else:
            start = aware(row[0])
            before = int(row[1]) if start == minute else 0
            await conn.execute(update(alert_counters).where(alert_counters.c.key == key)
                               .values(window_start=minute, count=before + n))
        if rules.over_uses_per_minute(before, before + n, limit):
            raised += 1
            await raise_alert_in(
                conn, audit_key, at, policy.slack.incident_channel, USES_PER_MINUTE,
                f"The token of {request_id} was used more than {limit} times in one minute "
                f"({before + n} by {minute:%H:%M} UTC).",
                {"jti": jti, "count": before + n, "limit": limit,
                 "minute": minute.isoformat()}, request_id)
    return raised


async def prune_use_counters(db: Database, now: datetime) -> int:
    """Delete the `uses:<jti>` counters whose minute is long past (otherwise one row per
    token ever used stays for ever). Harmless to run in every replica at once: a missing
    row counts as a new minute, which is what an old row counts as too."""
    async with db.transaction() as conn:
        result = await conn.execute(delete(alert_counters).where(and_(
            alert_counters.c.key.like(f"{USES_PREFIX}%"),
            alert_counters.c.window_start < now - USES_KEEP)))
    return int(result.rowcount or 0)
