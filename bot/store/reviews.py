"""Post-incident reviews and grant look-ups: rows in, core objects out."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..core.domain import Request, State
from ..core.reviews import ReviewState, Timeline
from .requests import find_grant_id, load
from .schema import decisions, requests, reviews, token_uses
from .sqlite_driver import stored_datetime
from .times import aware


def _to_review(row: Any) -> ReviewState:
    return ReviewState(
        request_id=row.request_id, requester=row.requester, scope=row.scope,
        ended_at=aware(row.ended_at),
        due_at=aware(row.due_at),
        reviewed_at=aware(row.reviewed_at), reviewed_by=row.reviewed_by, summary=row.summary,
        reminded_at=aware(row.reminded_at), alerted_at=aware(row.alerted_at))


async def insert_reviews(conn: AsyncConnection, opened: list[ReviewState]) -> None:
    """Several reviews in one statement (the grants a reload's batch ended)."""
    if not opened:
        return
    if conn.dialect.name == "sqlite" and len(opened) > 1:  # straight to the driver
        await conn.exec_driver_sql(
            "INSERT INTO reviews (request_id, requester, scope, ended_at, due_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(r.request_id, r.requester, r.scope, stored_datetime(r.ended_at),
              stored_datetime(r.due_at)) for r in opened])
        return
    rows = [{"request_id": r.request_id, "requester": r.requester, "scope": r.scope,
             "ended_at": r.ended_at, "due_at": r.due_at} for r in opened]
    await conn.execute(insert(reviews), rows if len(rows) > 1 else rows[0])


async def load_review(conn: AsyncConnection, request_id: str) -> ReviewState | None:
    row = (await conn.execute(select(reviews).where(reviews.c.request_id == request_id))).first()
    return _to_review(row) if row else None


async def sign_off(conn: AsyncConnection, request_id: str, user: str, summary: str,
                   at: datetime) -> bool:
    """Record the sign-off; False when someone signed it off first."""
    result = await conn.execute(
        update(reviews).where(and_(reviews.c.request_id == request_id,
                                   reviews.c.reviewed_at.is_(None)))
        .values(reviewed_at=at, reviewed_by=user, summary=summary))
    return bool(result.rowcount == 1)


async def needing_action(conn: AsyncConnection, now: datetime, remind_every: timedelta | None,
                         limit: int = 200) -> list[ReviewState]:
    """Overdue reviews whose alert or next reminder is due (one indexed read a sweep)."""
    todo = or_(reviews.c.alerted_at.is_(None), reviews.c.reminded_at.is_(None))
    if remind_every is not None:
        todo = or_(todo, reviews.c.reminded_at <= now - remind_every)
    rows = (await conn.execute(
        select(reviews).where(and_(reviews.c.reviewed_at.is_(None), reviews.c.due_at <= now, todo))
        .order_by(reviews.c.due_at).limit(limit))).all()
    return [_to_review(r) for r in rows]


async def listed(conn: AsyncConnection, *, open_only: bool, now: datetime,
                 overdue_only: bool = False, limit: int = 10_000) -> list[ReviewState]:
    where: Any = reviews.c.reviewed_at.is_(None) if open_only or overdue_only else true()
    if overdue_only:
        where = and_(where, reviews.c.due_at <= now)
    rows = (await conn.execute(select(reviews).where(where).order_by(reviews.c.due_at)
                               .limit(limit))).all()
    return [_to_review(r) for r in rows]


async def mark_reminded(conn: AsyncConnection, review: ReviewState, at: datetime) -> bool:
    """Claim this reminder (once across processes): False when another process did."""
    same = (reviews.c.reminded_at.is_(None) if review.reminded_at is None
            else reviews.c.reminded_at == review.reminded_at)
    result = await conn.execute(
        update(reviews).where(and_(reviews.c.request_id == review.request_id,
                                   reviews.c.reviewed_at.is_(None), same))
        .values(reminded_at=at))
    return bool(result.rowcount == 1)


async def mark_alerted(conn: AsyncConnection, request_id: str, at: datetime) -> bool:
    result = await conn.execute(
        update(reviews).where(and_(reviews.c.request_id == request_id,
                                   reviews.c.reviewed_at.is_(None),
                                   reviews.c.alerted_at.is_(None)))
        .values(alerted_at=at))
    return bool(result.rowcount == 1)


async def overdue_for(conn: AsyncConnection, requester: str, now: datetime,
                      limit: int = 10) -> list[str]:
    """IDs of the requester's overdue reviews, oldest first."""
    rows = await conn.execute(
        select(reviews.c.request_id).where(and_(
            reviews.c.requester == requester, reviews.c.reviewed_at.is_(None),
            reviews.c.due_at <= now)).order_by(reviews.c.due_at).limit(limit))
    return [r[0] for r in rows]


async def requester_load(conn: AsyncConnection, requester: str, recent: Any,
                         now: datetime) -> tuple[int, int, str | None]:
    """One statement for every new request: `recent` (an SQL expression: what counts
    towards the requester's rate limit), how many of their reviews are overdue, and the
    oldest of those."""
    late = and_(reviews.c.requester == requester, reviews.c.reviewed_at.is_(None),
                reviews.c.due_at <= now)
    n_late = select(func.count()).select_from(reviews).where(late).scalar_subquery()
    first = (select(reviews.c.request_id).where(late).order_by(reviews.c.due_at).limit(1)
             .scalar_subquery())
    row = (await conn.execute(select(recent, n_late, first))).one()
    return int(row[0] or 0), int(row[1] or 0), row[2]


async def find_grant(conn: AsyncConnection, ident: str) -> Request | None:
    """The request with this ID (any case) or whose token has this jti."""
    request_id = await find_grant_id(conn, ident)
    return await load(conn, request_id) if request_id else None


async def timeline(conn: AsyncConnection, req: Request) -> Timeline:
    """The grant's story from the tables: decisions with their times, uses."""
    decided = (await conn.execute(
        select(decisions.c.user_id, decisions.c.decision, decisions.c.at)
        .where(decisions.c.request_id == req.id).order_by(decisions.c.at))).all()
    used = (await conn.execute(
        select(func.min(token_uses.c.first_at), func.sum(token_uses.c.count))
        .where(token_uses.c.request_id == req.id))).one()
    return Timeline(
        request_id=req.id, scope=req.scope, requester=req.requester, incident=req.incident,
        requested_at=req.created_at,
        decisions=tuple((u, d, aware(at)) for u, d, at in decided),
        issued_at=req.issued_at, revealed_at=req.revealed_at,
        first_use_at=aware(used[0]), uses=int(used[1] or 0),
        ended=req.state.value, ended_at=req.closed_at, ended_by=req.closed_by)


def live_grants() -> Any:
    return requests.c.state.in_([State.ISSUED.value, State.REVEALED.value])


def grants_of(*, user: str | None = None, scope: str | None = None) -> Any:
    where = live_grants()
    if user is not None:
        where = and_(where, requests.c.requester == user)
    if scope is not None:
        where = and_(where, requests.c.scope == scope)
    return where


async def use_counts(conn: AsyncConnection, request_ids: list[str]) -> dict[str, int]:
    if not request_ids:
        return {}
    rows = await conn.execute(
        select(token_uses.c.request_id, func.sum(token_uses.c.count))
        .where(token_uses.c.request_id.in_(request_ids)).group_by(token_uses.c.request_id))
    return {r[0]: int(r[1] or 0) for r in rows}


__all__ = ["find_grant", "grants_of", "insert_reviews", "listed", "live_grants",
           "load_review", "mark_alerted", "mark_reminded", "needing_action", "overdue_for", "requester_load",
           "sign_off", "timeline", "use_counts"]
