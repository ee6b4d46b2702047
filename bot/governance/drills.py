"""Drills (contract section 7.4): rehearsing the whole flow before the emergency.

`/breakglass drill SCOPE` runs the real flow (the service marks the request
`drill`): the card, the DM and every incident post say DRILL, the triggers are
probed and shown but need not hold, approvers decide as for real, and the token
is real but for the audience `breakglass-drill`, with `breakglass.drill: true`,
which introspection answers `{"active": false}` to, for every client.

This module holds what only drills have:

* `at_reveal`: in the reveal's transaction, the drill's times go to the incident
  channel (command -> card, -> quorum, -> reveal);
* `observe_access`: after it, `breakglass_time_to_access_seconds` (command ->
  reveal) for every request, labelled `kind=real|drill`;
* `remind`: once a day, across every process, the scopes not rehearsed within
  `[drills] every` are named in the incident channel;
* `history` / `overdue`: what `breakglass drills` prints.

A scope counts as rehearsed once a drill's token for it was revealed (or, with
`delivery = "message"`, delivered): that is the whole flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import metrics
from ..audit import AuditEvent
from ..core.domain import Request
from ..core.durations import format_period
from ..core.policy import Policy
from ..delivery import outbox
from ..slack import blocks
from ..store import requests as store
from ..store.periodic import claim_run
from ..store.schema import periodic_runs, requests, slack_messages
from ..store.times import aware

if TYPE_CHECKING:
    from ..service import Service, Writes

REMINDER = "drill_reminder"  # its row in periodic_runs
REMIND_EVERY = timedelta(days=1)


@dataclass(frozen=True)
class Times:
    """A drill's figures, each measured from the command."""

    command_at: datetime
    card_at: datetime | None
    quorum_at: datetime | None
    reveal_at: datetime | None

    def since_command(self, at: datetime | None) -> timedelta | None:
        return None if at is None else at - self.command_at


async def card_posted_at(conn: AsyncConnection, req: Request) -> datetime:
    """When the request's approval card reached Slack: the outbox records it in
    `slack_messages` (key `card:<id>`, `posted_at`) in the transaction that marks the post
    sent, one primary-key read. Until it is sent (or for a card recorded before
    `posted_at` existed), the request's opening time stands in."""
    posted = await conn.scalar(select(slack_messages.c.posted_at)
                               .where(slack_messages.c.key == f"card:{req.id}"))
    return aware(posted) or req.created_at


async def times_of(conn: AsyncConnection, req: Request) -> Times:
    return Times(req.command_at or req.created_at, await card_posted_at(conn, req),
                 req.issued_at, req.revealed_at)


async def at_reveal(service: Service, w: Writes, req: Request, now: datetime) -> None:
    """Called in the transaction that reveals (or delivers) a token: a drill's times go
    to the incident channel and into the audit log (event `drill`)."""
    if not req.drill or req.issued_at is None:
        return
    command_at = req.command_at or req.created_at
    card_at = await card_posted_at(w.conn, req)
    w.rows.append(outbox.post_row(now, service.incident_channel, blocks.incident_drill_times(
        req, command_at, card_at, req.issued_at, now)))
    w.events.append(AuditEvent(at=now, actor="breakglass", event="drill", details={
        "scope": req.scope, "drill": True,
        "to_card_s": round((card_at - command_at).total_seconds(), 3),
        "to_quorum_s": round((req.issued_at - command_at).total_seconds(), 3),
        "to_reveal_s": round((now - command_at).total_seconds(), 3)}, request_id=req.id))


def observe_access(req: Request, revealed_at: datetime) -> None:
    """After the reveal committed: command -> reveal, for real requests and drills."""
    start = req.command_at or req.created_at
    seconds = max(0.0, (revealed_at - start).total_seconds())
    metrics.TIME_TO_ACCESS.labels(kind="drill" if req.drill else "real").observe(seconds)


# -- what has been rehearsed ----------------------------------------------------


async def last_rehearsed(conn: AsyncConnection) -> dict[str, datetime]:
    """Scope -> when a drill's token for it was last revealed."""
    rows = (await conn.execute(
        select(requests.c.scope, func.max(requests.c.revealed_at))
        .where(and_(requests.c.drill.is_(True),
                    requests.c.revealed_at.is_not(None)))
        .group_by(requests.c.scope))).all()
    return {scope: at for scope, at in ((s, aware(a)) for s, a in rows) if at is not None}


@dataclass(frozen=True)
class Overdue:
    scope: str
    last: datetime | None  # None: never rehearsed


async def overdue(conn: AsyncConnection, policy: Policy, now: datetime) -> list[Overdue]:
    """The policy's scopes not rehearsed within `[drills] every` (none when it is unset)."""
    every = policy.drills.every
    if every is None:
        return []
    last = await last_rehearsed(conn)
    return [Overdue(name, last.get(name)) for name in sorted(policy.scopes)
            if last.get(name) is None or last[name] <= now - every]


async def history(conn: AsyncConnection, limit: int = 50) -> list[tuple[Request, Times]]:
    """The latest drills, newest first, with their figures."""
    rows = (await conn.execute(
        select(requests.c.id).where(requests.c.drill.is_(True))
        .order_by(requests.c.created_at.desc()).limit(limit))).scalars().all()
    found = []
    for request_id in rows:
        req = await store.load(conn, request_id)
        if req is not None:
            found.append((req, await times_of(conn, req)))
    return found


def reminder_text(due: Sequence[Overdue], every: timedelta) -> str:
    parts = [f"`{d.scope}` ({'never' if d.last is None else 'last ' + blocks.when(d.last)})"
             for d in due]
    return (f":performing_arts: *drills due*: not rehearsed within {format_period(every)}: "
            f"{', '.join(parts)}. Rehearse with `/breakglass drill SCOPE`; "
            "`breakglass drills` lists past drills.")


# -- the daily reminder ----------------------------------------------------------


async def remind(service: Service, now: datetime) -> int:
    """Once a day (across processes): name the scopes not rehearsed within `every`."""
    every = service.policy.drills.every
    if every is None:
        return 0
    async with service.db.read() as conn:  # the common case: not due, and no write lock
        last = aware(await conn.scalar(select(periodic_runs.c.last_run_at)
                                        .where(periodic_runs.c.name == REMINDER)))
    if last is not None and last > now - REMIND_EVERY:
        return 0
    async with service.write() as w:
        if not await claim_run(w.conn, REMINDER, now, REMIND_EVERY):
            return 0
        due = await overdue(w.conn, service.policy, now)
        if not due:
            return 0
        w.rows.append(outbox.post_row(now, service.incident_channel, reminder_text(due, every)))
        w.events.append(AuditEvent(at=now, actor="breakglass", event="drills_due",
                                   details={"scopes": [d.scope for d in due]}))
    return 1


# -- `breakglass drills` ----------------------------------------------------------


def _span(td: timedelta | None) -> str:
    return "-" if td is None else blocks.seconds(td)


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def as_json(req: Request, t: Times) -> dict[str, object]:
    def secs(at: datetime | None) -> float | None:
        span = t.since_command(at)
        return None if span is None else round(span.total_seconds(), 3)

    return {"id": req.id, "scope": req.scope, "requester": req.requester,
            "state": req.state.value, "incident": req.incident,
            "started_at": t.command_at.isoformat(), "approvers": list(req.approvals),
            "to_card_s": secs(t.card_at), "to_quorum_s": secs(t.quorum_at),
            "to_reveal_s": secs(t.reveal_at)}


def report(past: Sequence[tuple[Request, Times]], due: Sequence[Overdue],
           every: timedelta | None, now: datetime) -> str:
    """What `breakglass drills` prints."""
    lines = []
    if past:
        lines.append(f"Drills, newest first ({len(past)}):")
        for req, t in past:
            lines.append(
                f"  {req.id}  {_utc(t.command_at)}  {req.scope}  by {req.requester}  "
                f"{req.state.value}  command → card {_span(t.since_command(t.card_at))}, "
                f"→ quorum {_span(t.since_command(t.quorum_at))}, "
                f"→ reveal {_span(t.since_command(t.reveal_at))}")
    else:
        lines.append("No drills yet. Rehearse a scope with `/breakglass drill SCOPE` in Slack.")
    if every is None:
        lines.append("[drills] every is not set in the policy: no scope is due for a drill.")
    elif due:
        lines.append(f"Scopes not rehearsed within {format_period(every)}:")
        lines += [f"  {d.scope} ({'never' if d.last is None else 'last ' + _utc(d.last)})"
                  for d in due]
    else:
        lines.append(f"Every scope was rehearsed within {format_period(every)}.")
    return "\n".join(lines)
