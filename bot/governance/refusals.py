"""Refusals, counted per person (contract §7.5 `refusals_per_hour`, issue 13 item 4).

Every security-relevant refusal (a trigger that does not hold, a rate limit, a
person outside the requester or approver groups, a second reveal…) goes through
`record`, inside the refusing use case's transaction:

* it is counted (table `refusals`); the refusals that suggest probing or abuse
  (`RATE_COUNTED`: asking for what one may not have, a trigger that does not hold,
  the rate limit itself) over the person's `rate_window` add to their requests for
  `[requests] rate_limit` (`rate_count_query`), so a flood of them is soon refused
  before any trigger is probed. Harmless ones (`NOT_RATE_COUNTED`: a click on a card
  that just closed, a second reveal, Slack not answering who is in a group, a review
  signed off too early…) count towards no rate limit: an approver racing clicks is
  never refused their own emergency request;
* up to the hourly threshold (`[alerts] refusals_per_hour`, else
  `DEFAULT_REFUSALS_PER_HOUR`) it is audited (`refused`) and, when the caller has an
  incident post for it, posted, one by one, as before;
* the refusal just past the threshold is audited too and, when `refusals_per_hour`
  is set, raises an alert;
* later ones are only counted: `summarise` (the sweeper, every second) writes, per
  person and at most once a minute, one `refused` audit row with `"summary": true`
  and the count by code, and one incident-channel line. So 40 refused commands give
  a handful of audit rows and posts, not 40, and cannot delay real `issued` and
  `used` posts behind Slack's one-post-per-second channel limit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import audit
from ..core import alerts as rules
from ..core.policy import Policy
from ..delivery import outbox
from ..store import requests as store
from ..store.db import Database
from ..store.schema import alert_counters, refusals
from ..store.times import aware
from . import alerts

log = logging.getLogger(__name__)

AUDITED, PENDING, SUMMARISED = "audited", "pending", "summarised"
PRUNE_EVERY = timedelta(minutes=1)


def threshold(policy: Policy) -> int:
    configured = policy.alerts.refusals_per_hour
    return configured if configured is not None else rules.DEFAULT_REFUSALS_PER_HOUR


#: Refusal codes that count towards `[requests] rate_limit`: they suggest probing or
#: abuse (docs/policy.md, `rate_limit`).
RATE_COUNTED = frozenset({
    "not_a_requester",  # requesting a scope one may not request
    "not_an_approver",  # approving or denying without being an approver
    "own_request",  # approving one's own request
    "not_requester",  # revealing someone else's token
    "not_allowed_to_revoke",  # revoking someone else's grant
    "not_allowed_inventory",  # listing live grants without being an approver or reviewer
    "not_a_reviewer",  # signing off a review without being a reviewer
    "requester_cannot_review",  # signing off the review of one's own grant
    "trigger_not_holding",  # requesting when the live conditions do not hold
    "rate_limited",  # asking again past the limit
    "unknown_scope",  # naming scopes that do not exist
})

#: Refusal codes that count towards no rate limit: a race, an outage, a mistake in
#: timing. (Both sets together name every code; tests/test_alerts.py checks that.)
NOT_RATE_COUNTED = frozenset({
    "request_closed",  # a click on a card that just reached quorum or closed
    "already_approved", "already_revealed", "already_reviewed", "already_closed",
    "token_closed",
    "membership_unconfirmed",  # Slack could not say who is in a group
    "grant_live", "no_review", "drill_no_review",  # a review asked for too early or of nothing
    "not_escalated_yet",  # a fallback approver clicking before the escalation
    "quorum_unreachable", "scope_removed", "review_overdue", "unknown_request",
    "policy_changed",  # a reload in the middle of a command or a click: send it again
    "missing_reason", "missing_summary", "summary_too_long",
    "secret_in_reason", "secret_in_summary",
})


def count_since_query(user: str, since: datetime) -> Any:
    """Every refusal of `user` since `since` (for the hourly threshold)."""
    return select(func.count()).where(and_(refusals.c.user_id == user, refusals.c.at >= since))


def rate_count_query(user: str, since: datetime) -> Any:
    """The refusals of `user` since `since` that count towards `[requests] rate_limit`."""
    return select(func.count()).where(and_(refusals.c.user_id == user, refusals.c.at >= since,
                                           refusals.c.code.in_(sorted(RATE_COUNTED))))


async def count_since(conn: AsyncConnection, user: str, since: datetime) -> int:
    """The person's refusals since `since` (all of them, audited or summarised)."""
    n = await conn.scalar(count_since_query(user, since))
    return int(n or 0)


async def record(w: alerts.Writes, conn: AsyncConnection, policy: Policy, now: datetime, *,
                 user: str, code: str, details: Mapping[str, Any],
                 request_id: str | None = None, post: str | None = None,
                 drill: bool = False) -> bool:
    """Count one refusal of `user` and audit (and `post`) it, or leave it to the next
    summary (see the module docstring). Returns whether it was audited one by one."""
    if drill:
        # Drills count for no threshold and no rate limit of real requests: audited, as is.
        verdict = rules.RefusalVerdict(individually=True, alert=False)
        in_hour = 0
    else:
        await store.lock_requester(conn, user)  # PostgreSQL: one person's counts in turn
        in_hour = await count_since(conn, user, now - rules.HOUR) + 1
        verdict = rules.judge_refusal(in_hour, policy.alerts.refusals_per_hour)
        scope = details.get("scope")
        await conn.execute(refusals.insert().values(
            user_id=user, at=now, code=code, scope=scope if isinstance(scope, str) else None,
            state=AUDITED if verdict.individually else PENDING))
    if not verdict.individually:
        return False
    w.events.append(audit.AuditEvent(at=now, actor=user, event="refused",
                                     details={"code": code, **details}, request_id=request_id))
    if post is not None:
        w.rows.append(outbox.post_row(now, policy.slack.incident_channel, post))
    if verdict.alert:
        limit = policy.alerts.refusals_per_hour
        alerts.raise_alert(
            w, now, policy.slack.incident_channel, rules.REFUSALS_PER_HOUR,
            f"<@{user}> was refused {in_hour} times in the last hour (the limit is {limit}). "
            "Further refusals are summarised here at most once a minute.",
            {"user": user, "count": in_hour, "limit": limit, "code": code})
    return True


class Summariser:
    """`run` (from the sweeper): one summary per person with pending refusals, at most
    once a `SUMMARY_EVERY`; and the old rows pruned once a minute. Safe from several
    processes: each summary is decided again under the write lock."""

    def __init__(self, db: Database, audit_key: bytes) -> None:
        self.db = db
        self.audit_key = audit_key
        self._pruned: datetime | None = None

    async def run(self, policy: Policy, now: datetime) -> int:
        async with self.db.read() as conn:
            users = [str(r[0]) for r in await conn.execute(
                select(refusals.c.user_id).where(refusals.c.state == PENDING).distinct())]
        done = 0
        for user in users:
            try:
                done += await self._summarise(policy, user, now)
            except Exception:  # noqa: BLE001 - one person's summary must not stop the rest
                log.exception("could not summarise refusals of %s", user)
        if self._pruned is None or now - self._pruned >= PRUNE_EVERY:
            self._pruned = now
            await self._prune(policy, now)
        return done

    async def _summarise(self, policy: Policy, user: str, now: datetime) -> int:
        key = f"refusal-summary:{user}"
        async with self.db.transaction() as conn:
            await store.lock_requester(conn, user)
            last = (await conn.execute(select(alert_counters.c.last_at)
                                       .where(alert_counters.c.key == key))).first()
            if last is not None and not rules.summary_due(aware(last[0]), now):
                return 0
            rows = (await conn.execute(
                select(refusals.c.id, refusals.c.at, refusals.c.code, refusals.c.scope)
                .where(and_(refusals.c.user_id == user, refusals.c.state == PENDING))
                .order_by(refusals.c.id))).all()
            if not rows:
                return 0
            ids = [r[0] for r in rows]
            await conn.execute(update(refusals).where(refusals.c.id.in_(ids))
                               .values(state=SUMMARISED))
            codes = Counter(str(r[2]) for r in rows)
            scopes = sorted({str(r[3]) for r in rows if r[3]})
            first, latest = aware(rows[0][1]), aware(rows[-1][1])
            await audit.append(conn, self.audit_key, at=now, actor=user, event="refused",
                               details={"summary": True, "count": len(rows),
                                        "codes": dict(codes), "scopes": scopes,
                                        "first_at": first, "last_at": latest})
            listed = ", ".join(f"{c} ×{n}" for c, n in codes.most_common())
            await outbox.post(conn, now, policy.slack.incident_channel,
                              f":no_entry: <@{user}> was refused {len(rows)} more time(s) "
                              f"between {first:%H:%M:%S} and {latest:%H:%M:%S} UTC ({listed}); "
                              "not posted one by one.")
            if last is None:
                await conn.execute(alert_counters.insert().values(
                    key=key, window_start=now, count=len(rows), last_at=now))
            else:
                await conn.execute(update(alert_counters).where(alert_counters.c.key == key)
                                   .values(window_start=now, count=len(rows), last_at=now))
        return 1

    async def _prune(self, policy: Policy, now: datetime) -> None:
        keep = max(rules.HOUR, policy.requests.rate_window) + timedelta(minutes=5)
        async with self.db.transaction() as conn:
            await conn.execute(delete(refusals).where(
                and_(refusals.c.at < now - keep, refusals.c.state != PENDING)))
