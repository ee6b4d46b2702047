"""When the policy or a group changes: end what it no longer allows (contract §7.3).

`reconcile_policy` runs at start and after every reload: every live grant the
running policy would not grant any more (`core.grants.outlived`) is revoked with
its reason, and every pending request for a scope that is gone is cancelled.
`membership.MembershipRecheck` revokes through `revoke_many` too.

Thousands of grants can end at once (a scope removed in the middle of a large
incident), and what matters first is that their tokens stop working. The
live grants are read `SCAN` at a time (each distinct scope and grant judged
once), and those to end are closed in batches of `BATCH`, each one
transaction holding what stops the tokens: a conditional
`UPDATE … WHERE id IN (…) AND state IN ('issued', 'revealed')`, their token
closures (every replica's introspection hears of them), a `revoked` audit row
per grant, and follow-up rows in the outbox (`JOB`, `FOLLOW_UP` grants each).
Of two processes reconciling at once, each grant is matched by exactly one
`UPDATE`, so it is revoked and audited once.

The rest is done by the follow-ups (`follow_up`), which the outbox runs once
the pass is over, each in one transaction that first marks its row done (so
once across processes, and after a crash by whichever process is alive):
the holder's DM edited so no token text stays in Slack and the approval card
(both rendered when sent), the incident posts (more than `FEW` grants ended
for one reason in one follow-up are announced in one post that lists them),
and the grants' post-incident reviews (`Service.on_grant_end`).

Two batches are in flight (`LANES`): while one waits for its commit's fsync,
the next one's transaction runs. Between batches the pass waits for the
foreground (`Foreground.wait`), so Slack's requests are answered first; while
it runs the outbox holds its sends (`foreground.Passes`, at most `MAX_HOLD`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..core.domain import Request, State
from ..core.grants import outlived_grant, outlived_lifetime
from ..delivery import outbox
from ..delivery.outbox import Rendered
from ..slack import blocks
from ..store import closures
from ..store import requests as store
from ..store.schema import decisions, not_indexed, requests
from ..store.times import aware as _aware

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)

BATCH = 100
LANES = 2  # batches in flight: one's fsync overlaps the next one's transaction
FOLLOW_UP = 25  # grants per follow-up row: each one's transaction holds the loop briefly
JOB = "revoked_batch"  # outbox kind of the follow-up rows (`follow_up`)
JOB_LANE = "job:revoked"  # + ":<first request id>": a lane per follow-up
ANNOUNCE = "revoked_post"  # payload["render"] of a pass's incident posts
# The pass's process runs its follow-ups right after the pass; one it has not run this
# long after it was made (that process died, or the follow-up failed) is run by the
# outbox of any process.
JOB_GRACE = timedelta(seconds=10)
SCAN = 1000  # live grants read at a time to decide which the new policy outlives
FEW = 3
YieldTo = Callable[[], Awaitable[None]] | None


@dataclass(frozen=True)
class Reconciled:
    revoked: int = 0
    cancelled: int = 0


async def reconcile_policy(service: Service, yield_to: YieldTo = None) -> Reconciled:
    policy = service.policy  # one policy for the whole pass, even if another reload comes
    now = service.clock.now()
    revoke: dict[str, str] = {}
    # Grants are alike by the thousand (one scope, one grant): each distinct one is
    # parsed and judged once.
    verdicts: dict[tuple[str, str | None, bool], str | None] = {}
    after = ""
    while True:  # the live grants a page at a time, so no read holds the loop for long
        if after and yield_to is not None:
            await yield_to()
        async with service.db.read() as conn:
            live = (await conn.execute(
                select(requests.c.id, requests.c.scope, requests.c.grant,
                       requests.c.token_expires_at, requests.c.drill)
                .where(and_(store.live_tokens(), requests.c.id > after))
                .order_by(requests.c.id).limit(SCAN))).all()
        for rid, scope, grant, expires_at, drill in live:
            key = (scope, grant, bool(drill))
            if key not in verdicts:
                verdicts[key] = outlived_grant(policy, scope, json.loads(grant) if grant else {},
                                               drill=bool(drill))
            why = verdicts[key] or outlived_lifetime(policy, scope, _aware(expires_at), now)
            if why is not None:
                revoke[rid] = why
        if len(live) < SCAN:
            break
        after = live[-1][0]
    async with service.db.read() as conn:
        pending = (await conn.execute(
            select(requests.c.id, requests.c.scope)
            .where(requests.c.state == State.PENDING.value))).all()
    cancel = {row.id: f"scope {row.scope} was removed from the policy"
              for row in pending if policy.scope_named(row.scope) is None}
    revoked = await revoke_many(service, revoke, actor="policy", yield_to=yield_to)
    cancelled = await cancel_many(service, cancel, actor="policy", yield_to=yield_to)
    return Reconciled(revoked, cancelled)


async def _close(conn: AsyncConnection, ids: list[str], src: list[State], dst: State, *,
                 columns: Sequence[Any] = tuple(requests.c), **values: Any) -> list[Any]:
    """Move those of `ids` still in `src` to `dst`; the rows this statement moved, as
    they are now (`columns` of them; every column: `_moved` makes them requests
    without reading again)."""
    # The ids as one expanding parameter: SQLAlchemy neither coerces each of them when
    # the statement is built nor compiles it again for the next batch.
    result = await conn.execute(
        update(requests)
        .where(and_(requests.c.id.in_(bindparam("ids", expanding=True)),
                    not_indexed(requests.c.state).in_([s.value for s in src])))
        .values(state=dst.value, version=requests.c.version + 1, **values)
        .returning(*columns), {"ids": list(ids)})
    return list(result)


async def _moved(conn: AsyncConnection, moved: Sequence[Any]) -> list[Request]:
    """The requests `_close` moved, with their decisions (one read for the batch)."""
    decided: dict[str, list[tuple[str, str]]] = {r.id: [] for r in moved}
    for rid, user, decision in (await conn.execute(
            select(decisions.c.request_id, decisions.c.user_id, decisions.c.decision)
            .where(decisions.c.request_id.in_(list(decided))).order_by(decisions.c.at))).all():
        decided[rid].append((user, decision))
    return [store.to_request(r, decided[r.id]) for r in moved]


async def revoke_many(service: Service, reasons: Mapping[str, str], *, actor: str,
                      yield_to: YieldTo = None) -> int:
    """Revoke the live grants `reasons` names (request id -> why). Returns how many this
    process revoked (a grant already closed, here or elsewhere, is left alone).

    Per grant, in its batch's transaction: the state change, its token closure, its
    audit row, its announcement (alone, or in one post with the batch's others for the
    same reason), and its share of a follow-up row (`follow_up`: the DM and card edits,
    the review), run right after the pass."""
    ids = list(reasons)
    if not ids:
        return 0
    jobs: list[tuple[int, dict[str, Any]]] = []
    started = time.monotonic()
    with service.passes.running_pass():  # the outbox holds its sends meanwhile
        done = await _revoke_batches(service, ids, reasons, actor, yield_to, jobs)
    passed = time.monotonic()
    await _follow_ups(service, sorted(jobs, key=lambda job: job[0]), yield_to)
    if done:
        log.info("revoked %d grant(s) (%s) in %.2fs; their follow-ups (edits, reviews) in "
                 "%.2fs more", done, actor, passed - started, time.monotonic() - passed)
    return done


async def _revoke_batches(service: Service, ids: list[str], reasons: Mapping[str, str],
                          actor: str, yield_to: YieldTo, jobs: list[tuple[int, dict[str, Any]]],
                          ) -> int:
    """The batches, by `LANES` tasks taking the next one in turn: while one waits for
    its commit's fsync (on a thread: `WalSync`), another's transaction runs. Each
    still returns only once its own commit is durable."""
    batches = iter([ids[start:start + BATCH] for start in range(0, len(ids), BATCH)])

    async def lane() -> int:
        done = 0
        for batch in batches:  # shared: each batch is taken by one lane
            if yield_to is not None:
                await yield_to()
            done += await _revoke_batch(service, batch, reasons, actor, jobs)
        return done

    lanes = [asyncio.ensure_future(lane()) for _ in range(LANES)]
    try:
        return sum(await asyncio.gather(*lanes))  # a failure is raised as it is
    finally:
        for task in lanes:  # after a failure: the other lane stops at its next wait
            task.cancel()


async def _revoke_batch(service: Service, batch: list[str], reasons: Mapping[str, str],
                        actor: str, jobs: list[tuple[int, dict[str, Any]]]) -> int:
    """What stops the tokens, in one transaction: the state change, the token closures,
    an audit row per grant, the announcements, and the follow-up rows (`follow_up`)
    that do the rest (added to `jobs` once committed)."""
    now = service.clock.now()
    payloads: list[dict[str, Any]] = []
    async with service.write() as w:
        moved = await _close(w.conn, batch, [State.ISSUED, State.REVEALED], State.REVOKED,
                             columns=(requests.c.id, requests.c.scope, requests.c.drill),
                             closed_at=now, closed_by=actor)
        if not moved:
            return 0
        # Every process's introspection cache hears of it (store/closures.py).
        await closures.record_many(w.conn, [r.id for r in moved], now)
        by_reason: dict[str, list[str]] = defaultdict(list)
        for r in moved:
            service.record(w, actor, "revoked", {"scope": r.scope, "why": reasons[r.id],
                                                 "via": actor}, r.id, drill=bool(r.drill))
            by_reason[reasons[r.id]].append(r.id)
        # The announcements, with the revocation (rendered when sent: `render`).
        for why, rids in by_reason.items():
            for group in ([[rid] for rid in rids] if len(rids) <= FEW else [rids]):
                w.rows.append(outbox.render_post_row(
                    now, service.incident_channel, None, ANNOUNCE, ids=group, why=why,
                    actor=actor))
        rows = []
        for start in range(0, len(moved), FOLLOW_UP):
            part = moved[start:start + FOLLOW_UP]
            payloads.append({"actor": actor, "reasons": {r.id: reasons[r.id] for r in part}})
            # A lane each: follow-ups need no order, and one that keeps failing holds
            # back no other.
            job = outbox.row(now, lane=f"{JOB_LANE}:{part[0].id}", kind=JOB,
                             payload=payloads[-1])
            job["next_attempt_at"] = now + JOB_GRACE  # this process runs it first
            rows.append(job)
        made = list(zip(await outbox.enqueue_returning_ids(w.conn, rows), payloads, strict=True))
    jobs.extend(made)
    return len(moved)


async def _follow_ups(service: Service, jobs: list[tuple[int, dict[str, Any]]],
                      yield_to: YieldTo) -> None:
    """Run the follow-ups this pass made, in order, waiting for the foreground before
    each. One that fails is left to the outbox (due `JOB_GRACE` after it was made)."""
    for row_id, payload in jobs:
        if yield_to is not None:
            await yield_to()
        try:
            await follow_up(service, payload, row_id)
        except Exception as exc:  # noqa: BLE001 - the outbox runs it again
            log.warning("revocation follow-up %d failed (%s); the outbox runs it again",
                        row_id, type(exc).__name__)


async def follow_up(service: Service, payload: Mapping[str, Any], row_id: int) -> None:
    """The rest of revoking `payload["reasons"]` (request id -> why): each holder's DM
    and each card edited (rendered when sent: no token text stays in Slack) and the
    grants' post-incident reviews (`Service.on_grant_end`). Run by the pass's process
    right after the pass (`revoke_many`), or else by any process's outbox
    (`Dispatcher.jobs`), in one transaction that first marks its row done
    (`outbox.finish_job`): once across processes, retries and restarts."""
    reasons: dict[str, str] = dict(payload.get("reasons") or {})
    now = service.clock.now()
    async with service.write() as w:
        if not await outbox.finish_job(w.conn, row_id, now):
            return
        rows = (await w.conn.execute(
            select(requests).where(requests.c.id.in_(list(reasons))).order_by(requests.c.id))).all()
        ended = await _moved(w.conn, rows) if rows else []
        channel = service.reviewer_channel
        for req in ended:
            w.rows.append(outbox.render_row(now, f"dm:{req.id}", f"dm:{req.requester}",
                                            "dm_closed", request_id=req.id,
                                            why=reasons[req.id]))
            w.rows.append(outbox.render_row(now, f"card:{req.id}", channel, "card",
                                            request_id=req.id))
        for hook in service.on_grant_end:  # the review threads (contract §7.1), together
            await hook(w, ended)
    service.wake_outbox()


async def render(service: Service, payload: Mapping[str, Any]) -> Rendered | None:
    """The text of an edit `revoke_many` queued unrendered, as the request stands now
    (or of a row another module queued unrendered: `Service.renderers`)."""
    other = service.renderers.get(str(payload.get("render")))
    if other is not None:
        return await other(dict(payload))
    if payload.get("render") == ANNOUNCE:
        return await _announcement(service, payload)
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


async def _announcement(service: Service, payload: Mapping[str, Any]) -> Rendered | None:
    """The incident post for grants a batch revoked for one reason: each on its own
    (up to `FEW`), or one post that lists them."""
    ids = [str(i) for i in payload.get("ids") or []]
    why, actor = str(payload.get("why") or ""), str(payload.get("actor") or "policy")
    async with service.db.read() as conn:
        rows = (await conn.execute(
            select(requests).where(requests.c.id.in_(ids)).order_by(requests.c.id))).all()
    if not rows:
        return None
    reqs = [store.to_request(r, []) for r in rows]
    if len(reqs) == 1:
        return Rendered(blocks.incident_revoked(reqs[0]) + f" ({blocks.escape(why)})")
    return Rendered(blocks.incident_bulk_revoked(reqs, actor, why))


async def cancel_many(service: Service, reasons: Mapping[str, str], *, actor: str,
                      yield_to: YieldTo = None) -> int:
    """Cancel the pending requests `reasons` names (request id -> why)."""
    ids = list(reasons)
    done = 0
    for start in range(0, len(ids), BATCH):
        if yield_to is not None:
            await yield_to()
        now = service.clock.now()
        async with service.write() as w:
            moved = await _close(w.conn, ids[start:start + BATCH], [State.PENDING],
                                 State.CANCELLED, closed_at=now, closed_by=actor)
            for req in await _moved(w.conn, moved) if moved else []:
                why = reasons[req.id]
                service.record(w, actor, "cancelled",
                               {"scope": req.scope, "why": why, "via": actor}, req.id,
                               drill=req.drill)
                service.post_card(w, req, service.policy.scope_named(req.scope))
                service.post_incident(
                    w, blocks.incident_cancelled(req) + f" ({blocks.escape(why)})")
                w.rows.append(outbox.post_row(
                    now, req.requester, f"Your break-glass request {req.id} for {req.scope} was "
                    f"cancelled: {blocks.escape(why)}. Nothing was granted.",
                    lane=f"dm:{req.requester}"))
        done += len(moved)
        if moved:
            service.wake_outbox()
    return done
