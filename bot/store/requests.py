"""Requests and decisions: rows in, domain objects out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..core.domain import Request, State, TriggerResult
from . import closures
from .schema import decisions, requests
from .times import aware


def to_request(row: Any, decided: list[tuple[str, str]]) -> Request:
    """A `requests` row (every column) and its decisions (user, decision), in order."""
    approvals = tuple(sorted(u for u, d in decided if d == "approve"))
    denied = next((u for u, d in decided if d == "deny"), None)
    return Request(
        id=row.id,
        scope=row.scope,
        requester=row.requester,
        reason=row.reason,
        incident=row.incident,
        requested_ttl=timedelta(seconds=row.requested_ttl_s),
        ttl=timedelta(seconds=row.ttl_s),
        state=State(row.state),
        created_at=aware(row.created_at),
        expires_at=aware(row.expires_at),
        triggers=tuple(TriggerResult.from_dict(t) for t in json.loads(row.triggers or "[]")),
        approvals=approvals,
        denied_by=denied,
        closed_at=aware(row.closed_at),
        closed_by=row.closed_by,
        jti=row.jti,
        kid=row.kid,
        issued_at=aware(row.issued_at),
        token_expires_at=aware(row.token_expires_at),
        revealed_at=aware(row.revealed_at),
        drill=bool(row.drill),
        command_at=aware(row.command_at),
        escalated_at=aware(row.escalated_at),
        warned_at=aware(row.warned_at),
        overdue_reviews=tuple(json.loads(row.overdue_reviews)) if row.overdue_reviews else (),
        extra={"grant": json.loads(row.grant)} if row.grant else {},
    )


async def load(conn: AsyncConnection, request_id: str, *, lock: bool = False) -> Request | None:
    """The request and its decisions. Unlocked (and on SQLite, where BEGIN IMMEDIATE
    already serialises writers): one statement, a LEFT JOIN with a row per decision.
    Locked on PostgreSQL: the row lock first, then the decisions in a second statement,
    which sees decisions committed while this one waited for the lock (a single locking
    statement keeps the snapshot it took before waiting)."""
    if lock and conn.dialect.name != "sqlite":
        row = (await conn.execute(
            select(requests).where(requests.c.id == request_id).with_for_update())).first()
        if row is None:
            return None
        decided = (await conn.execute(
            select(decisions.c.user_id, decisions.c.decision)
            .where(decisions.c.request_id == request_id).order_by(decisions.c.at))).all()
        return to_request(row, [(u, d) for u, d in decided])
    stmt = (
        select(requests, decisions.c.user_id.label("d_user"), decisions.c.decision.label("d_decision"))
        .select_from(requests.outerjoin(decisions, decisions.c.request_id == requests.c.id))
        .where(requests.c.id == request_id)
        .order_by(decisions.c.at)
    )
    rows = (await conn.execute(stmt)).all()
    if not rows:
        return None
    decided = [(r.d_user, r.d_decision) for r in rows if r.d_user is not None]
    return to_request(rows[0], decided)


async def load_many(conn: AsyncConnection, where: Any, limit: int = 200) -> list[Request]:
    rows = (
        await conn.execute(select(requests).where(where).order_by(requests.c.created_at).limit(limit))
    ).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    decided: dict[str, list[tuple[str, str]]] = {i: [] for i in ids}
    for rid, user, decision in (
        await conn.execute(
            select(decisions.c.request_id, decisions.c.user_id, decisions.c.decision)
            .where(decisions.c.request_id.in_(ids))
        )
    ).all():
        decided[rid].append((user, decision))
    return [to_request(r, decided[r.id]) for r in rows]


async def insert_request(conn: AsyncConnection, req: Request) -> None:
    await conn.execute(
        insert(requests).values(
            id=req.id,
            scope=req.scope,
            requester=req.requester,
            reason=req.reason,
            incident=req.incident,
            requested_ttl_s=int(req.requested_ttl.total_seconds()),
            ttl_s=int(req.ttl.total_seconds()),
            state=req.state.value,
            triggers=json.dumps([t.as_dict() for t in req.triggers]),
            created_at=req.created_at,
            expires_at=req.expires_at,
            overdue_reviews=json.dumps(list(req.overdue_reviews)) if req.overdue_reviews else None,
            version=0,
            drill=req.drill,
            command_at=req.command_at,
        )
    )


async def transition(
    conn: AsyncConnection, request_id: str, src: Iterable[State], dst: State, **values: Any
) -> bool:
    """Move a request from one of `src` to `dst`; False when it was not in `src` any more.

    The WHERE on state is the lock: of two concurrent transitions, one
    matches a row and the other matches none.
    """
    src = tuple(src)
    result = await conn.execute(
        update(requests)
        .where(and_(requests.c.id == request_id, requests.c.state.in_([s.value for s in src])))
        .values(state=dst.value, version=requests.c.version + 1, **values)
    )
    moved_ = bool(result.rowcount == 1)
    if moved_ and dst in _CLOSING and State.REVEALED in src:
        # Every process's introspection cache hears of it (store/closures.py).
        await closures.record(conn, request_id, values.get("closed_at") or datetime.now(UTC))
    return moved_


def moved(req: Request, dst: State, **values: Any) -> Request:
    """`req` as it stands after `transition(conn, req.id, src, dst, **values)` returned True.

    What a reload would give, without the reload: the same columns, turned into
    fields the way `load` does (datetimes in UTC, `grant` parsed into `extra`).
    """
    fields: dict[str, Any] = {"state": dst}
    extra = dict(req.extra)
    for name, value in values.items():
        if name == "grant":
            if value:
                extra["grant"] = json.loads(value)
            else:
                extra.pop("grant", None)
        elif name in _NOT_FIELDS:
            continue
        elif name not in _FIELDS:
            raise TypeError(f"moved() does not know the column {name!r}")
        else:
            fields[name] = value.astimezone(UTC) if isinstance(value, datetime) else value
    return replace(req, extra=extra, **fields)


_FIELDS = frozenset({"closed_at", "closed_by", "jti", "kid", "issued_at", "token_expires_at",
                     "revealed_at", "escalated_at", "warned_at"})
_CLOSING = frozenset({State.REVOKED, State.EXPIRED})
_NOT_FIELDS = frozenset({"token_hash"})  # stored, never part of a Request


def decided(req: Request, user: str, decision: str) -> Request:
    """`req` as it stands after `add_decision(conn, req.id, user, decision, ...)`."""
    if decision == "approve":
        return replace(req, approvals=tuple(sorted({*req.approvals, user})))
    return replace(req, denied_by=req.denied_by or user)


async def add_decision(
    conn: AsyncConnection, request_id: str, user: str, decision: str, at: datetime
) -> None:
    await conn.execute(
        insert(decisions).values(request_id=request_id, user_id=user, decision=decision, at=at)
    )


async def lock_requester(conn: AsyncConnection, requester: str) -> None:
    """Serialise one requester's request-opening transactions until this one ends, so a
    count and the insert that follows it are atomic. SQLite: every write transaction
    already holds the database's write lock (BEGIN IMMEDIATE). PostgreSQL: a
    transaction-scoped advisory lock on the requester."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                           {"key": f"breakglass:requests:{requester}"})


def count_since_query(requester: str, since: datetime, *, drill: bool = False) -> Any:
    return select(func.count()).where(
        and_(requests.c.requester == requester, requests.c.created_at >= since,
             requests.c.drill == drill))


async def count_since(conn: AsyncConnection, requester: str, since: datetime, *,
                      drill: bool = False) -> int:
    """Requests `requester` opened since `since`: real ones, or (`drill=True`) drills.
    A drill never counts towards the limit on real requests."""
    n = await conn.scalar(count_since_query(requester, since, drill=drill))
    return int(n or 0)


def open_for(user: str) -> Any:
    return and_(
        requests.c.requester == user,
        requests.c.state.in_([State.PENDING.value, State.ISSUED.value, State.REVEALED.value]),
    )


def due(now: datetime) -> Any:
    return or_(
        and_(requests.c.state == State.PENDING.value, requests.c.expires_at <= now),
        and_(
            requests.c.state.in_([State.ISSUED.value, State.REVEALED.value]),
            requests.c.token_expires_at <= now,
        ),
    )


def live_tokens() -> Any:
    return requests.c.state.in_([State.ISSUED.value, State.REVEALED.value])


def needs_escalation(before: datetime) -> Any:
    return and_(
        requests.c.state == State.PENDING.value,
        requests.c.escalated_at.is_(None),
        requests.c.created_at <= before,
    )


def needs_warning(now: datetime, warn_before: timedelta) -> Any:
    """Live tokens that end within `warn_before` and were not warned about yet. A token
    that lives no longer than `warn_before` is never warned about (its DM already says
    when it ends), so it is left out here rather than read again at every sweep."""
    return and_(
        requests.c.state.in_([State.ISSUED.value, State.REVEALED.value]),
        requests.c.warned_at.is_(None),
        requests.c.ttl_s > int(warn_before.total_seconds()),
        requests.c.token_expires_at > now,
        requests.c.token_expires_at <= now + warn_before,
    )


async def mark_warned(conn: AsyncConnection, request_id: str, at: datetime) -> bool:
    """Claim the expiry warning of one token: True for exactly one caller, across processes."""
    result = await conn.execute(
        update(requests)
        .where(and_(requests.c.id == request_id, requests.c.warned_at.is_(None),
                    requests.c.state.in_([State.ISSUED.value, State.REVEALED.value])))
        .values(warned_at=at)
    )
    return bool(result.rowcount == 1)


async def mark_escalated(conn: AsyncConnection, request_id: str, at: datetime) -> bool:
    result = await conn.execute(
        update(requests)
        .where(and_(requests.c.id == request_id, requests.c.escalated_at.is_(None),
                    requests.c.state == State.PENDING.value))
        .values(escalated_at=at)
    )
    return bool(result.rowcount == 1)


async def find_grant_id(conn: AsyncConnection, ref: str) -> str | None:
    """The request a person or a relying service means by `ref`: its request ID (in any
    case, as people type it) or its token's `jti` (exactly as in the token: a jti is
    base64url, so its case matters). None when neither matches."""
    ref = ref.strip()
    if not ref:
        return None
    row = (await conn.execute(
        select(requests.c.id).where(or_(requests.c.id == ref.upper(), requests.c.jti == ref))
        .limit(1))).first()
    return str(row[0]) if row else None


async def find_by_hash(conn: AsyncConnection, token_hash: str) -> Request | None:
    row = (await conn.execute(select(requests.c.id).where(requests.c.token_hash == token_hash))).first()
    return await load(conn, row[0]) if row else None
