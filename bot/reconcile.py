"""When the policy or a group changes: end what it no longer allows (contract §7.3).

`reconcile_policy` runs at start and after every reload: every live grant the
running policy would not grant any more (`core.grants.outlived`) is revoked with
its reason, and every pending request for a scope that is gone is cancelled.
`membership.MembershipRecheck` revokes through `revoke_many` too.

Thousands of grants can end at once (a scope removed in the middle of a large
incident), so they are closed in batches of `BATCH`, each one transaction:
a conditional `UPDATE … WHERE id IN (…) AND state IN ('issued', 'revealed')
RETURNING id`, an audit row per grant, and the outbox rows (card, the holder's
DM edited so no token text stays in Slack, the incident post) together. Of two
processes reconciling at once, each grant is matched by exactly one `UPDATE`,
so it is revoked, audited and announced once. Between batches the pass waits
for the foreground (`Foreground.wait`), so Slack's requests are answered first.
More than `FEW` grants ended for one reason in one batch are announced in one
incident post that lists them, instead of one post each.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from . import outbox
from .core.domain import State
from .core.grants import outlived
from .outbox import Rendered
from .slack import blocks
from .store import closures
from .store import requests as store
from .store.schema import requests

if TYPE_CHECKING:
    from .service import Service

BATCH = 200
FEW = 3
YieldTo = Callable[[], Awaitable[None]] | None


@dataclass(frozen=True)
class Reconciled:
    revoked: int = 0
    cancelled: int = 0


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def reconcile_policy(service: Service, yield_to: YieldTo = None) -> Reconciled:
    policy = service.policy  # one policy for the whole pass, even if another reload comes
    now = service.clock.now()
    async with service.db.read() as conn:
        live = (await conn.execute(
            select(requests.c.id, requests.c.scope, requests.c.grant, requests.c.token_expires_at,
                   requests.c.drill)
            .where(store.live_tokens()))).all()
        pending = (await conn.execute(
            select(requests.c.id, requests.c.scope)
            .where(requests.c.state == State.PENDING.value))).all()
    revoke: dict[str, str] = {}
    for row in live:
        grant = json.loads(row.grant) if row.grant else {}
        why = outlived(policy, row.scope, grant, _aware(row.token_expires_at), now,
                       drill=bool(row.drill))
        if why is not None:
            revoke[row.id] = why
    cancel = {row.id: f"scope {row.scope} was removed from the policy"
              for row in pending if policy.scope_named(row.scope) is None}
    revoked = await revoke_many(service, revoke, actor="policy", yield_to=yield_to)
    cancelled = await cancel_many(service, cancel, actor="policy", yield_to=yield_to)
    return Reconciled(revoked, cancelled)


async def _close(conn: AsyncConnection, ids: list[str], src: list[State], dst: State,
                 **values: Any) -> list[Any]:
    """Move those of `ids` still in `src` to `dst`; the rows this statement moved."""
    result = await conn.execute(
        update(requests)
        .where(and_(requests.c.id.in_(ids), requests.c.state.in_([s.value for s in src])))
        .values(state=dst.value, version=requests.c.version + 1, **values)
        .returning(requests.c.id, requests.c.scope, requests.c.requester, requests.c.incident,
                   requests.c.drill))
    return list(result)


async def revoke_many(service: Service, reasons: Mapping[str, str], *, actor: str,
                      yield_to: YieldTo = None) -> int:
    """Revoke the live grants `reasons` names (request id -> why). Returns how many this
    process revoked (a grant already closed, here or elsewhere, is left alone).

    Per grant, in its batch's transaction: the state change, its token closure, its
    audit row, and two outbox edits rendered when they are sent (`render`): the
    holder's DM (the token text removed, the reason given) and the approval card."""
    ids = list(reasons)
    done = 0
    for start in range(0, len(ids), BATCH):
        if yield_to is not None:
            await yield_to()
        now = service.clock.now()
        async with service._write() as w:
            moved = await _close(w.conn, ids[start:start + BATCH], [State.ISSUED, State.REVEALED],
                                 State.REVOKED, closed_at=now, closed_by=actor)
            if not moved:
                continue
            # Every process's introspection cache hears of it (store/closures.py).
            await closures.record_many(w.conn, [r.id for r in moved], now)
            by_reason: dict[str, list[Any]] = defaultdict(list)
            channel = service.reviewer_channel
            moved_ids = [r.id for r in moved]
            for req in await store.load_many(w.conn, requests.c.id.in_(moved_ids),
                                             limit=len(moved_ids)):
                why = reasons[req.id]
                service._audit(w, actor, "revoked", {"scope": req.scope, "why": why, "via": actor},
                               req.id, drill=req.drill)
                w.rows.append(outbox.render_row(now, f"dm:{req.id}", f"dm:{req.requester}",
                                                "dm_closed", request_id=req.id, why=why))
                w.rows.append(outbox.render_row(now, f"card:{req.id}", channel, "card",
                                                request_id=req.id))
                for hook in service.on_grant_end:  # the review thread (contract §7.1)
                    await hook(w, req)
                by_reason[why].append(req)
            for why, group in by_reason.items():
                if len(group) <= FEW:
                    for req in group:
                        service._incident(
                            w, blocks.incident_revoked(req) + f" ({blocks.escape(why)})")
                else:
                    service._incident(w, blocks.incident_bulk_revoked(group, actor, why))
        done += len(moved)
        service.wake_outbox()
    return done


async def render(service: Service, payload: Mapping[str, Any]) -> Rendered | None:
    """The text of an edit `revoke_many` queued unrendered, as the request stands now."""
    async with service.db.read() as conn:
        req = await store.load(conn, str(payload.get("request_id")))
    if req is None:
        return None
    if payload.get("render") == "dm_closed":
        text, dm_blocks = blocks.dm_closed(req, payload.get("why"))
        return Rendered(text, dm_blocks)
    if payload.get("render") == "card":
        text, card_blocks = service.card_of(req, service.policy.scope_named(req.scope))
        return Rendered(text, card_blocks)
    return None


async def cancel_many(service: Service, reasons: Mapping[str, str], *, actor: str,
                      yield_to: YieldTo = None) -> int:
    """Cancel the pending requests `reasons` names (request id -> why)."""
    ids = list(reasons)
    done = 0
    for start in range(0, len(ids), BATCH):
        if yield_to is not None:
            await yield_to()
        now = service.clock.now()
        async with service._write() as w:
            moved = await _close(w.conn, ids[start:start + BATCH], [State.PENDING],
                                 State.CANCELLED, closed_at=now, closed_by=actor)
            moved_ids = [r.id for r in moved]
            for req in await store.load_many(w.conn, requests.c.id.in_(moved_ids),
                                             limit=len(moved_ids)):
                why = reasons[req.id]
                service._audit(w, actor, "cancelled",
                               {"scope": req.scope, "why": why, "via": actor}, req.id,
                               drill=req.drill)
                service._card(w, req, service.policy.scope_named(req.scope))
                service._incident(
                    w, blocks.incident_cancelled(req) + f" ({blocks.escape(why)})")
                w.rows.append(outbox.post_row(
                    now, req.requester, f"Your break-glass request {req.id} for {req.scope} was "
                    f"cancelled: {blocks.escape(why)}. Nothing was granted.",
                    lane=f"dm:{req.requester}"))
        done += len(moved)
        if moved:
            service.wake_outbox()
    return done
