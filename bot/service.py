"""Use cases. Each one reads state, decides with the core, and writes the new
state, its audit row and its outbox rows in one transaction. Nothing here
calls Slack: the outbox does, after commit.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from . import audit, metrics
from .core import quorum, tokens
from .core.clock import Clock
from .core.domain import Request, State, TriggerResult
from .core.errors import Refusal
from .core.grants import ceiling
from .core.policy import Policy, Scope
from .delivery import outbox
from .delivery.outbox import Rendered
from .directory import Directory
from .foreground import Passes
from .governance import alerts, drills, escalation, expiry, refusals
from .governance.live_policy import LivePolicy
from .keys import KeyRing
from .slack import blocks, review_blocks
from .store import closures
from .store import requests as store
from .store import reviews as review_store
from .store.db import Database
from .store.schema import requests as requests_table
from .triggers import Prober

log = logging.getLogger(__name__)

CLIENT_ID = "breakglass"
SECRET_IN_REASON = "secret_in_reason"
_ID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def new_request_id() -> str:
    return "R" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(7))


# A click looks up its approvers (maybe in Slack) outside its transaction; if a reload
# changed them meanwhile, it looks again, this many times in all.
_POLICY_RACE_TRIES = 3


def _scope_removed(request_id: str) -> str:
    return (f"The scope of {request_id} is no longer in the policy, so it cannot be approved "
            "any more. Nothing was changed; the requester can ask for another scope.")


def card_key(request_id: str) -> str:
    return f"card:{request_id}"


def dm_key(request_id: str) -> str:
    return f"dm:{request_id}"


def dm_lane(user: str) -> str:
    return f"dm:{user}"


class _Writes:
    """What one use case's transaction writes besides its state change: audit events
    and outbox rows. They are collected as the use case runs and written when it ends
    (`Service._write`): one head read and one INSERT for the events, one INSERT for the
    rows, in the order they were added. Nothing is written if the use case raises."""

    __slots__ = ("conn", "events", "rows")

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.events: list[audit.AuditEvent] = []
        self.rows: list[dict[str, Any]] = []

    async def flush(self, audit_key: bytes) -> None:
        events, rows = self.events, self.rows
        self.events, self.rows = [], []
        if events:
            await audit.append_many(self.conn, audit_key, events)
        await outbox.enqueue_many(self.conn, rows)


_SCOPE_CACHE = 10_000  # request id -> scope name, for clicks (a request's scope never changes)


@dataclass(frozen=True)
class Draft:
    """A request that passed every check that needs no probe."""

    scope_name: str
    scope: Scope
    requester: str
    reason: str
    incident: str | None
    requested_ttl: timedelta
    ttl: timedelta
    clamped: bool
    drill: bool = False
    command_at: datetime | None = None  # when the command reached the bot
    overdue_reviews: int = 0  # the requester's overdue post-incident reviews (the card warns)


# Called with ended grants in a transaction: the one that ended it (an expiry, a
# revocation), or a revocation pass's follow-up, in which up to `reconcile.FOLLOW_UP`
# grants the pass ended get the rest of their ending (`reconcile.follow_up`).
GrantsEnded = Callable[["_Writes", Sequence[Request]], Awaitable[None]]
# Makes the text of an outbox row queued unrendered (payload `render`), at send time.
Renderer = Callable[[dict[str, Any]], Awaitable[Rendered | None]]
# The public name of a use case's writes, for the use cases in bot/governance/.
Writes = _Writes


class Service:
    def __init__(
        self,
        db: Database,
        policy: Policy | LivePolicy,
        keyring: KeyRing,
        directory: Directory,
        prober: Prober,
        clock: Clock,
        audit_key: bytes,
        wake_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self.db = db
        self.live = LivePolicy.of(policy)
        self.keyring = keyring
        self.directory = directory
        self.prober = prober
        self.clock = clock
        self.audit_key = audit_key
        self.wake_outbox = wake_outbox
        self._rate_alerts: dict[str, datetime] = {}
        self.refusal_summaries = refusals.Summariser(db, audit_key)
        self._scopes: dict[str, str] = {}
        # Called in the transaction that ends grants (expiry, any revocation), after their
        # state change: e.g. the post-incident review (bot/governance/reviews.py).
        self.on_grant_end: list[GrantsEnded] = []
        # payload["render"] -> what makes that row's text when the outbox sends it, for
        # rows the modules beside this one queue unrendered (e.g. "review").
        self.renderers: dict[str, Renderer] = {}
        self.passes = Passes()  # revocation passes running (the outbox holds meanwhile)

    # -- helpers -----------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The running policy (read it once per decision: a reload may swap it)."""
        return self.live.policy

    @property
    def reviewer_channel(self) -> str:
        return self.policy.slack.reviewer_channel

    @property
    def incident_channel(self) -> str:
        return self.policy.slack.incident_channel

    def approver_label(self, scope: Scope, escalated: bool = False) -> str:
        """The groups whose clicks count: the fallback approvers too once escalated."""
        groups = list(scope.approvers)
        if escalated:
            groups += [g for g in scope.fallback_approvers if g not in groups]
        return ", ".join(groups)

    async def approvers(self, scope: Scope) -> frozenset[str]:
        return await self.directory.members(scope.approvers)

    async def fallback_approvers(self, scope: Scope) -> frozenset[str]:
        if not scope.fallback_approvers:
            return frozenset()
        return await self.directory.members(scope.fallback_approvers)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[_Writes]:
        """One write transaction; its audit events and outbox rows are written at its end."""
        async with self.db.transaction() as conn:
            w = _Writes(conn)
            yield w
            await w.flush(self.audit_key)

    # For the use cases that live beside this one (bot/governance/): the same transaction
    # with its audit events and outbox rows, the same audited refusal.

    def write(self) -> AbstractAsyncContextManager[Writes]:
        """`async with service.write() as w:` one use case's transaction (see `Writes`)."""
        return self._write()

    def record(self, w: _Writes, actor: str, event: str, details: dict[str, Any],
               request_id: str | None = None, *, drill: bool = False) -> None:
        """An audit event, written with the transaction `w` (`drill`: see `_audit`)."""
        self._audit(w, actor, event, details, request_id, drill=drill)

    def post_incident(self, w: _Writes, text: str) -> None:
        """A post to the incident channel, sent once `w` commits."""
        self._incident(w, text)

    def post_card(self, w: _Writes, req: Request, scope: Scope | None) -> None:
        """The approval card of `req` edited to how it stands, once `w` commits."""
        self._card(w, req, scope)

    async def refuse(self, actor: str, refusal: Refusal, details: dict[str, Any],
                     request_id: str | None = None) -> Refusal:
        return await self._refuse(actor, refusal, details, request_id)

    def _remember_scope(self, request_id: str, scope_name: str) -> None:
        scopes = self._scopes
        if request_id not in scopes and len(scopes) >= _SCOPE_CACHE:
            del scopes[next(iter(scopes))]  # the oldest
        scopes[request_id] = scope_name

    def _audit(self, w: _Writes, actor: str, event: str,
               details: dict[str, Any], request_id: str | None = None, *,
               drill: bool = False) -> None:
        """`drill`: the event is about a drill; its details say so (`"drill": true`), so an
        audit reader or a webhook receiver can leave drills out."""
        if drill:
            details = {**details, "drill": True}
        w.events.append(audit.AuditEvent(at=self.clock.now(), actor=actor, event=event,
                                         details=details, request_id=request_id))

    async def _refuse(self, actor: str, refusal: Refusal, details: dict[str, Any],
                      request_id: str | None = None) -> Refusal:
        """Record a security-relevant refusal (counted; audited, or summarised past the
        person's hourly threshold: governance/refusals.py); changes nothing else."""
        metrics.REFUSALS.labels(code=refusal.code).inc()
        async with self._write() as w:
            await self._refused(w, actor, refusal.code, details, request_id)
        self.wake_outbox()
        return refusal

    async def _refused(self, w: _Writes, user: str, code: str, details: dict[str, Any],
                       request_id: str | None = None, post: str | None = None,
                       drill: bool = False) -> bool:
        return await refusals.record(w, w.conn, self.policy, self.clock.now(), user=user,
                                     code=code, details=details, request_id=request_id,
                                     post=post, drill=drill)

    async def _recent(self, conn: AsyncConnection, user: str, now: datetime,
                      drill: bool = False) -> int:
        """What counts towards the rate limit in the window: real requests opened and
        the refusals that suggest probing (refusals.RATE_COUNTED); for a drill, only
        drills (a drill never uses up the real limit)."""
        since = now - self.policy.requests.rate_window
        if drill:
            return await store.count_since(conn, user, since, drill=True)
        # One statement: this count is on every request's path, twice.
        return int(await conn.scalar(select(self._recent_real(user, now))) or 0)

    def _recent_real(self, user: str, now: datetime) -> Any:
        """The count of `_recent` for a real request, as one SQL expression."""
        since = now - self.policy.requests.rate_window
        return (store.count_since_query(user, since).scalar_subquery()
                + refusals.rate_count_query(user, since).scalar_subquery())

    def _card(self, w: _Writes, req: Request, scope: Scope | None) -> None:
        w.rows.append(outbox.update_row(self.clock.now(), card_key(req.id), self.reviewer_channel,
                                        *self.card_of(req, scope)))

    def card_of(self, req: Request, scope: Scope | None) -> tuple[str, list[dict[str, Any]]]:
        """The approval card's text and blocks for `req` as it stands."""
        permissions = scope.permissions if scope else req.extra.get("grant", {}).get("permissions", [])
        quorum_n = scope.quorum if scope else len(req.approvals)
        label = self.approver_label(scope, req.escalated_at is not None) if scope else "approvers"
        tally = quorum.tally(req.approvals, quorum_n)
        return blocks.card_text(req), blocks.card(req, permissions, tally, label)

    def _incident(self, w: _Writes, text: str) -> None:
        w.rows.append(outbox.post_row(self.clock.now(), self.incident_channel, text))

    # -- request -------------------------------------------------------------

    async def prepare(self, user: str, scope_name: str, requested: timedelta | None,
                      reason: str, incident: str | None, *, drill: bool = False,
                      command_at: datetime | None = None) -> Draft:
        """Every check that needs no probe. A drill (`drill=True`) takes the policy's
        default lifetime and is rate-limited only against other drills."""
        scope = self.policy.scope_named(scope_name)
        if scope is None:
            names = ", ".join(f"`{n}`" for n in sorted(self.policy.scopes)) or "none"
            raise Refusal("unknown_scope", f"There is no scope `{blocks.escape(scope_name)}`. "
                          f"Scopes: {names}. "
                          "`/breakglass scopes` lists the ones you may request.")
        if not reason.strip():
            raise Refusal("missing_reason", "A reason is required: "
                          f"`/breakglass {scope_name} 30m INC-4521 what is broken`")
        if audit.looks_like_token(reason):
            # The audit log refuses token-shaped text, so it would fail later, silently.
            raise Refusal(SECRET_IN_REASON, "Your reason looks like it contains a secret "
                          "(a Slack token or a JWT). Remove it and send the request again; "
                          "nothing was recorded. If it is a real token, rotate it: it was "
                          "sent to Slack.")
        requesters = await self.directory.resolve(scope.requesters)
        if user not in requesters.members and requesters.unconfirmed:
            raise unconfirmed_membership(requesters.unconfirmed)
        if user not in requesters.members:
            raise await self._refuse(user, Refusal(
                "not_a_requester",
                f"You are not in a group allowed to request `{scope_name}` "
                f"({', '.join(scope.requesters)}). Ask one of its members, or an admin."),
                {"scope": scope_name})
        quorum.check_reachable(await self.approvers(scope), user, scope.quorum, scope_name)
        late, oldest_late = await self._check_rate(user, scope_name, drill)
        if late and self.policy.reviews.hold_requests:
            assert oldest_late is not None
            raise await self._refuse(user, Refusal("review_overdue", review_blocks.held(
                oldest_late, late)), {"scope": scope_name, "review": oldest_late})
        ttl, clamped = self.policy.effective_ttl(scope, None if drill else requested)
        return Draft(scope_name, scope, user, reason, incident,
                     (None if drill else requested) or self.policy.tokens.default_ttl, ttl,
                     clamped, drill, command_at, late)

    async def _check_rate(self, user: str, scope_name: str,
                          drill: bool = False) -> tuple[int, str | None]:
        """The early check, before the probes: refuses at once when the limit is already
        reached. `submit` counts again, atomically with the insert (the authoritative one).
        Real requests and drills are counted apart: a drill never uses up the limit of
        real requests (and real requests never block a drill). Else the requester's
        overdue reviews (how many, the oldest; none for a drill), read in the same
        statement."""
        limits = self.policy.requests
        now = self.clock.now()
        async with self.db.read() as conn:
            if drill:
                recent, late, oldest_late = await self._recent(conn, user, now, True), 0, None
            else:  # one statement: the rate count and the overdue reviews
                recent, late, oldest_late = await review_store.requester_load(
                    conn, user, self._recent_real(user, now), now)
        if recent < limits.rate_limit:
            return late, oldest_late
        async with self._write() as w:
            refusal = await self._rate_refusal(w, user, scope_name, recent, now, drill)
        self.wake_outbox()
        raise refusal

    async def _rate_refusal(self, w: _Writes, user: str, scope_name: str, recent: int,
                            now: datetime, drill: bool = False) -> Refusal:
        """Count and audit a rate-limit refusal (posted once per window) in `w`."""
        limits = self.policy.requests
        what = "drills" if drill else "requests"
        refusal = Refusal("rate_limited", f"You made {recent} {what} in the last "
                          f"{_fmt(limits.rate_window)}"
                          + ("" if drill else " (refused attempts count too)")
                          + f"; the limit is {limits.rate_limit}. "
                          + ("Wait before the next drill." if drill
                             else "Ask a colleague on call, or wait."))
        metrics.REFUSALS.labels(code=refusal.code).inc()
        last = self._rate_alerts.get(user)
        post = None
        if not drill and (last is None or now - last > limits.rate_window):
            post = blocks.incident_refused(
                user, scope_name, None,
                f"rate limit reached ({recent} requests or refusals in "
                f"{_fmt(limits.rate_window)})")
        if await self._refused(w, user, refusal.code, {"scope": scope_name, "recent": recent,
                                                       "drill": drill},
                               post=post, drill=drill) and post is not None:
            self._rate_alerts[user] = now
        return refusal

    async def submit(self, draft: Draft) -> Request:
        """Probe the triggers; refuse loudly when one does not hold, else open the request."""
        results = await self.prober.probe_all(draft.scope.triggers, self.policy.triggers)
        now = self.clock.now()
        failing = [r for r in results if not r.holds]
        if failing and not draft.drill:  # a drill shows its triggers; they need not hold
            why = "; ".join(f"trigger `{r.name}` does not hold ({r.description}: {r.detail})"
                            for r in failing)
            async with self._write() as w:
                await self._refused(w, draft.requester, "trigger_not_holding", {
                    "scope": draft.scope_name, "incident": draft.incident,
                    "triggers": [r.as_dict() for r in results]},
                    post=blocks.incident_refused(draft.requester, draft.scope_name,
                                                 draft.incident, why))
            self.wake_outbox()
            metrics.REQUESTS.labels(outcome="refused").inc()
            raise Refusal("trigger_not_holding",
                          f"Refused: {why}. Break-glass access to `{draft.scope_name}` is only "
                          "for when these conditions hold; use the normal access path.")
        req = Request(
            id=new_request_id(), scope=draft.scope_name, requester=draft.requester,
            reason=draft.reason, incident=draft.incident, requested_ttl=draft.requested_ttl,
            ttl=draft.ttl, state=State.PENDING, created_at=now,
            expires_at=now + self.policy.requests.expire_after, triggers=results,
            drill=draft.drill, command_at=draft.command_at,
        )
        refusal: Refusal | None = None
        async with self._write() as w:
            # The live policy, read again: a reload during the probes (contract §7.3) may
            # have removed the scope or lowered its limits; the request follows it.
            policy = self.policy
            live = policy.scope_named(draft.scope_name)
            if live is None:
                refusal = Refusal("scope_removed", f"The scope `{draft.scope_name}` was removed "
                                  "from the policy while your request was being checked. "
                                  "Nothing was recorded. `/breakglass scopes` lists the "
                                  "scopes you may request.")
            elif live.triggers != draft.scope.triggers:
                refusal = Refusal("policy_changed", "The policy changed the triggers of "
                                  f"`{draft.scope_name}` while your request was being checked. "
                                  "Nothing was recorded: send the same command again.")
            else:
                limit = ceiling(policy, draft.scope_name)
                if limit is not None and req.ttl > limit:
                    req = replace(req, ttl=limit)
                draft = replace(draft, scope=live, ttl=req.ttl)
                tally = quorum.tally((), live.quorum)
                req, refusal = await self._count_and_open(w, req, draft, tally, results, policy,
                                                          now)
        self.wake_outbox()
        if refusal is not None:
            raise refusal
        self._remember_scope(req.id, req.scope)
        metrics.REQUESTS.labels(outcome="opened").inc()
        return req

    async def _count_and_open(self, w: _Writes, req: Request, draft: Draft,
                              tally: quorum.Tally, results: Sequence[TriggerResult],
                              policy: Policy, now: datetime) -> tuple[Request, Refusal | None]:
        """Count and insert in one transaction, the requester's lock held: concurrent
        commands from one person cannot all pass the count before any inserts."""
        await store.lock_requester(w.conn, draft.requester)
        recent = await self._recent(w.conn, draft.requester, now, draft.drill)
        if recent >= policy.requests.rate_limit:
            return req, await self._rate_refusal(w, draft.requester, draft.scope_name,
                                                 recent, now, draft.drill)
        if draft.overdue_reviews:  # rare: only then are they listed, for the card
            req = replace(req, overdue_reviews=tuple(
                await review_store.overdue_for(w.conn, req.requester, now)))
        await self._open(w, req, draft, tally, results)
        await alerts.on_request(w, w.conn, policy, now, request_id=req.id,
                                requester=req.requester, scope=req.scope, drill=draft.drill)
        return req, None

    async def _open(self, w: _Writes, req: Request, draft: Draft, tally: quorum.Tally,
                    results: Sequence[TriggerResult]) -> None:
        """Insert the request, its audit row, its card and its incident post."""
        now = req.created_at
        await store.insert_request(w.conn, req)
        self._audit(w, req.requester, "requested", {
            "scope": req.scope, "ttl_s": int(req.ttl.total_seconds()),
            "requested_ttl_s": int(req.requested_ttl.total_seconds()),
            "reason": req.reason, "incident": req.incident, "drill": req.drill,
            "triggers": [r.as_dict() for r in results],
            **({"overdue_reviews": list(req.overdue_reviews)} if req.overdue_reviews else {}),
        }, req.id)
        w.rows.append(outbox.post_row(
            now, self.reviewer_channel, blocks.card_text(req),
            blocks.card(req, draft.scope.permissions, tally, self.approver_label(draft.scope)),
            key=card_key(req.id)))
        self._incident(w, blocks.incident_requested(req, tally))

    # -- decide ----------------------------------------------------------------

    async def decide(self, request_id: str, user: str, approve: bool) -> Request:
        """Count one Approve or Deny click. Quorum issues the token, once."""
        scope_name = self._scopes.get(request_id)
        if scope_name is None:
            # Only the scope is needed out here (its approvers may ask Slack: outside the
            # transaction); the transaction reads the request again and decides on that.
            async with self.db.read() as conn:
                current = await store.load(conn, request_id)
            if current is None:
                raise Refusal("unknown_request",
                              f"There is no request {blocks.escape(request_id)}.")
            scope_name = current.scope
            self._remember_scope(request_id, scope_name)
        decision = "approve" if approve else "deny"
        for _ in range(_POLICY_RACE_TRIES):
            scope = self.policy.scope_named(scope_name)
            if scope is None:
                raise Refusal("scope_removed", _scope_removed(request_id))
            # May ask Slack: outside the transaction. A membership Slack cannot confirm
            # (no answer within the last 10 minutes) is not assumed.
            membership = await self.directory.resolve(scope.approvers)
            approvers = membership.members
            backup = await self.directory.resolve(scope.fallback_approvers)
            fallback = backup.members
            unconfirmed = membership.unconfirmed + backup.unconfirmed
            if user not in approvers and user not in fallback and unconfirmed:
                raise await self._refuse(user, unconfirmed_membership(unconfirmed),
                                         {"action": decision}, request_id)
            now = self.clock.now()
            refusal: Refusal | None = None
            async with self._write() as w:
                # The live policy, read again: a reload during the lookups above (contract
                # §7.3) found no grant to revoke yet, so this one must follow the new policy.
                policy = self.policy
                live = policy.scope_named(scope_name)
                if live is None:
                    refusal = Refusal("scope_removed", _scope_removed(request_id))
                elif (live.approvers, live.fallback_approvers) != (
                        scope.approvers, scope.fallback_approvers):
                    continue  # other approvers now: look them up again (nothing written)
                else:
                    req = await store.load(w.conn, request_id, lock=True)
                    if req is None:  # pragma: no cover - requests are never deleted
                        raise Refusal("unknown_request", f"There is no request {request_id}.")
                    try:
                        quorum.judge_click(req, user, approvers, self.approver_label(live), now,
                                           fallback=fallback,
                                           escalated=req.escalated_at is not None,
                                           fallback_label=", ".join(live.fallback_approvers))
                    except Refusal as exc:
                        refusal = exc
                    if refusal is None:
                        req = await self._apply_decision(w, req, live, user, decision, now,
                                                         policy)
            if refusal is not None:
                raise await self._refuse(user, refusal, {"action": decision}, request_id)
            self.wake_outbox()
            if req.state == State.ISSUED and self.policy is not policy:
                await self._follow_reload(req)
            return req
        raise Refusal("policy_changed", "The policy changed several times while your click "
                      "was being checked. Click again.")

    async def _follow_reload(self, req: Request) -> None:
        """A reload swapped the policy while the grant's transaction was committing: its
        reconciliation may have read before the grant existed. Apply it to this grant."""
        from .core.grants import outlived
        from .governance.reconcile import revoke_many

        grant = dict(req.extra.get("grant") or {})
        why = outlived(self.policy, req.scope, grant, req.token_expires_at, self.clock.now(),
                       drill=req.drill)
        if why is not None:
            await revoke_many(self, {req.id: why}, actor="policy")

    async def _apply_decision(self, w: _Writes, req: Request, scope: Scope,
                              user: str, decision: str, now: datetime,
                              policy: Policy | None = None) -> Request:
        """`req` was read in this transaction (under its lock): the request after each
        write is built from it, not read again. `scope` is of `policy` (the live policy
        read in this transaction): the grant is its audience, permissions and ceiling."""
        policy = policy or self.policy
        conn = w.conn
        await store.add_decision(conn, req.id, user, decision, now)
        req = store.decided(req, user, decision)
        self._audit(w, user, "approved" if decision == "approve" else "denied",
                    {"scope": req.scope}, req.id, drill=req.drill)
        if decision == "deny":
            if not await store.transition(conn, req.id, [State.PENDING], State.DENIED,
                                          closed_at=now, closed_by=user):
                raise Refusal("request_closed", f"Request {req.id} is already closed.")
            req = store.moved(req, State.DENIED, closed_at=now, closed_by=user)
            self._card(w, req, scope)
            self._incident(w, blocks.incident_denied(req))
            w.rows.append(outbox.post_row(
                now, req.requester, blocks.dm_denied(req, user), lane=dm_lane(req.requester)))
            metrics.REQUESTS.labels(outcome="denied").inc()
            return req
        tally = quorum.tally(req.approvals, scope.quorum)
        if not tally.reached:
            self._card(w, req, scope)
            return req
        kid = self.keyring.current.kid
        grant: dict[str, Any] = {"audience": scope.audience, "permissions": list(scope.permissions)}
        if req.drill:  # a real token for no service: the drill audience, and the claim
            grant = {**grant, "audience": tokens.DRILL_AUDIENCE, "drill": True}
        limit = ceiling(policy, req.scope)  # a reload may have lowered it since the request
        ttl = req.ttl if limit is None else min(req.ttl, limit)
        values: dict[str, Any] = {
            "jti": tokens.new_jti(), "kid": kid, "issued_at": now,
            "token_expires_at": now + ttl, "grant": json.dumps(grant)}
        issued = await store.transition(conn, req.id, [State.PENDING], State.ISSUED, **values)
        if not issued:  # pragma: no cover - the lock above makes this unreachable
            raise Refusal("request_closed", f"Request {req.id} is already closed.")
        req = store.moved(req, State.ISSUED, **values)
        self._audit(w, "breakglass", "issued", {
            "scope": req.scope, "approvers": list(req.approvals), "kid": kid, "jti": req.jti,
            "expires_at": req.token_expires_at.isoformat() if req.token_expires_at else None,
        }, req.id, drill=req.drill)
        self._card(w, req, scope)
        if policy.tokens.delivery == "reveal":
            w.rows.append(outbox.post_row(
                now, req.requester, blocks.tag(req, f"Your break-glass access to {req.scope} "
                f"({req.id}) was approved. Reveal the token once."),
                blocks.dm_reveal(req), key=dm_key(req.id), lane=dm_lane(req.requester)))
        else:
            w.rows.append(outbox.row(now, lane=dm_lane(req.requester), kind="token_dm",
                                     payload={"request_id": req.id, "user": req.requester,
                                              "key": dm_key(req.id)}))
        self._incident(w, blocks.incident_issued(req))
        metrics.TOKENS_ISSUED.labels(scope=req.scope).inc()
        metrics.REQUESTS.labels(outcome="issued").inc()
        return req

    # -- token delivery --------------------------------------------------------

    def _mint(self, req: Request) -> str:
        """The token text, signed now with the current key (the row's kid is updated)."""
        grant = req.extra.get("grant") or {}
        assert req.issued_at is not None and req.jti is not None
        key = self.keyring.current
        # What was granted at issuance (a reload may have lowered the ceiling after the
        # request was opened), not what was asked for.
        lifetime = (req.token_expires_at - req.issued_at if req.token_expires_at is not None
                    else req.ttl)
        claims = tokens.build_claims(
            issuer=self.policy.tokens.issuer, subject=req.requester,
            audience=grant["audience"], permissions=grant["permissions"], client_id=CLIENT_ID,
            request_id=req.id, incident=req.incident, approvers=req.approvals,
            issued_at=req.issued_at, lifetime=lifetime, jti=req.jti,
            drill=bool(grant.get("drill")))
        return tokens.mint(claims, key)

    async def reveal(self, request_id: str, user: str) -> tuple[Request, str]:
        """The requester's one reveal: mint the token text, keep only its hash."""
        now = self.clock.now()
        refusal: Refusal | None = None
        token = ""
        async with self._write() as w:
            req = await store.load(w.conn, request_id, lock=True)
            if req is None:
                raise Refusal("unknown_request",
                              f"There is no request {blocks.escape(request_id)}.")
            if user != req.requester:
                refusal = Refusal("not_requester", "Only the requester can reveal this token.")
            elif req.state is State.REVEALED:
                refusal = Refusal("already_revealed", f"The token of {req.id} was already "
                                  "revealed and cannot be shown again. If it is lost, revoke it "
                                  "and make a new request.")
            elif req.state is not State.ISSUED or (req.token_expires_at and req.token_expires_at <= now):
                state = req.state.value if req.state is not State.ISSUED else "expired"
                refusal = Refusal("token_closed", f"The token of {req.id} is {state}; "
                                  "make a new request if you still need access.")
            else:
                token = self._mint(req)
                values: dict[str, Any] = {"token_hash": tokens.token_hash(token),
                                          "revealed_at": now, "kid": self.keyring.current.kid}
                if not await store.transition(w.conn, req.id, [State.ISSUED], State.REVEALED,
                                              **values):  # pragma: no cover - under the lock
                    raise Refusal("token_closed", f"The token of {req.id} is no longer "
                                  "issued; make a new request if you still need access.")
                req = store.moved(req, State.REVEALED, **values)
                self._audit(w, user, "revealed", {"scope": req.scope}, req.id, drill=req.drill)
                w.rows.append(outbox.update_row(now, dm_key(req.id), dm_lane(req.requester),
                                                blocks.tag(req, f"Token for {req.scope} "
                                                           f"({req.id}) revealed."),
                                                blocks.dm_revealed(req)))
                await drills.at_reveal(self, w, req, now)
        if refusal is not None:
            raise await self._refuse(user, refusal, {"action": "reveal"}, request_id)
        drills.observe_access(req, now)
        self.wake_outbox()
        return req, token

    async def unreveal(self, request_id: str, token: str) -> None:
        """The reveal modal could not be opened: the token never left; allow another try."""
        async with self._write() as w:
            req = await store.load(w.conn, request_id, lock=True)
            if req is None or req.state is not State.REVEALED:
                return
            ok = await w.conn.execute(
                requests_table.update().where(and_(
                    requests_table.c.id == request_id,
                    requests_table.c.token_hash == tokens.token_hash(token)))
                .values(state=State.ISSUED.value, token_hash=None, revealed_at=None))
            if ok.rowcount:
                self._audit(w, req.requester, "reveal_failed", {"scope": req.scope}, req.id)
                w.rows.append(outbox.update_row(self.clock.now(), dm_key(req.id),
                                                dm_lane(req.requester), "Reveal your token.",
                                                blocks.dm_reveal(req)))
        self.wake_outbox()

    async def materialise_dm(self, payload: dict[str, Any]) -> Rendered | None:
        """`delivery = "message"`: mint the token as the DM is sent; store its hash first.
        (Also the edits a bulk revocation queued unrendered: `reconcile.render`.)"""
        if payload.get("render"):
            from .governance.reconcile import render

            return await render(self, payload)
        now = self.clock.now()
        async with self._write() as w:
            req = await store.load(w.conn, payload["request_id"], lock=True)
            if req is None or req.state not in (State.ISSUED, State.REVEALED):
                return None
            if req.token_expires_at and req.token_expires_at <= now:
                return None
            token = self._mint(req)
            first = req.state is State.ISSUED
            # A retry after a crash mints again; the new hash replaces the old, so at most
            # one token text of a request is valid (the old one closed in every process).
            await closures.record_replaced(w.conn, req.id, tokens.token_hash(token), now)
            await w.conn.execute(
                requests_table.update().where(requests_table.c.id == req.id)
                .values(state=State.REVEALED.value, token_hash=tokens.token_hash(token),
                        revealed_at=now, kid=self.keyring.current.kid))
            self._audit(w, "breakglass", "delivered", {"scope": req.scope}, req.id,
                        drill=req.drill)
            if first:  # the DM is the reveal: timed once, whatever retries follow
                await drills.at_reveal(self, w, req, now)
        if first:
            drills.observe_access(req, now)
            self.wake_outbox()
        text, dm_blocks = blocks.dm_token_message(req, token)
        return Rendered(text, dm_blocks)

    # -- revoke and expiry -------------------------------------------------------

    async def revoke(self, ref: str, actor: str, *, via: str = "slack",
                     reason: str | None = None) -> Request:
        """Revoke a token, or cancel a pending request. `ref` is the request ID (any case)
        or the token's jti (exactly as in the token). Slack users: requester or approvers;
        other callers (a relying service, an operator at the command line) were checked by
        their own door. `reason` is audited and announced."""
        async with self.db.read() as conn:
            request_id = await store.find_grant_id(conn, ref)
            req = await store.load(conn, request_id) if request_id else None
        if req is None:
            raise Refusal("unknown_request", "There is no request or token "
                          f"`{blocks.escape(ref)}`: give the request ID (like R7K2QX9P) or "
                          "the token's jti. `/breakglass status` lists yours.")
        scope = self.policy.scope_named(req.scope)
        if via == "slack" and actor != req.requester:
            allowed = await self.approvers(scope) if scope else frozenset()
            if actor not in allowed:
                raise await self._refuse(actor, Refusal(
                    "not_allowed_to_revoke", f"Only the requester of {req.id} or an approver "
                    f"of `{req.scope}` can revoke it."), {"action": "revoke"}, req.id)
        now = self.clock.now()
        deadline = req.expires_at if req.is_pending else req.token_expires_at
        if req.state in _OPEN and deadline is not None and deadline <= now:
            # Past its deadline, before the sweeper closed it: expired, not revocable.
            what = "request" if req.is_pending else "token"
            raise Refusal("already_closed", f"The {what} {req.id} is already expired; "
                          "nothing to revoke.")
        why = {"reason": reason} if reason else {}
        said = f" Reason: {blocks.escape(reason)}" if reason else ""
        async with self._write() as w:
            # The request read above is not authoritative in here (decisions may have come
            # in since): after the conditional update, the request is read again.
            if await store.transition(w.conn, req.id, [State.PENDING], State.CANCELLED,
                                      closed_at=now, closed_by=actor):
                req = await _reload(w.conn, req.id)
                self._audit(w, actor, "cancelled", {"scope": req.scope, "via": via, **why},
                            req.id, drill=req.drill)
                self._card(w, req, scope)
                self._incident(w, blocks.incident_cancelled(req) + said)
            elif await store.transition(w.conn, req.id, [State.ISSUED, State.REVEALED],
                                        State.REVOKED, closed_at=now, closed_by=actor):
                req = await _reload(w.conn, req.id)
                self._audit(w, actor, "revoked", {"scope": req.scope, "via": via, **why},
                            req.id, drill=req.drill)
                await self._close_token(w, req, scope)
                self._incident(w, blocks.incident_revoked(req) + said)
            else:
                raise Refusal("already_closed", f"{req.id} is already {req.state.value}.")
        self.wake_outbox()
        return req

    async def _close_token(self, w: _Writes, req: Request, scope: Scope | None,
                           why: str | None = None) -> None:
        """Card to its final state, and the DM edited so no token text stays in Slack;
        then whatever else a grant's end sets going (`on_grant_end`)."""
        self._card(w, req, scope)
        text, dm_blocks = blocks.dm_closed(req, why)
        w.rows.append(outbox.update_row(self.clock.now(), dm_key(req.id),
                                        dm_lane(req.requester), text, dm_blocks))
        for hook in self.on_grant_end:
            await hook(w, [req])

    async def sweep(self) -> int:
        """Expire what is due and send reminders. Safe to run from any number of processes."""
        now = self.clock.now()
        async with self.db.read() as conn:
            due = await store.load_many(conn, store.due(now))
        done = 0
        for req in due:
            try:
                done += await self._expire(req, now)
            except Exception:  # noqa: BLE001 - one bad row must not stop every other expiry
                log.exception("could not expire %s", req.id)
        for job in (escalation.escalate, expiry.warn, drills.remind):
            try:
                done += await job(self, now)
            except Exception:  # noqa: BLE001 - one failing job must not stop the others
                log.exception("%s failed", job.__module__ + "." + job.__name__)
        try:
            done += await self.refusal_summaries.run(self.policy, now)
        except Exception:  # noqa: BLE001 - nor this one
            log.exception("refusal summaries failed")
        if done:
            self.wake_outbox()
        return done

    async def _expire(self, req: Request, now: datetime) -> int:
        scope = self.policy.scope_named(req.scope)
        async with self._write() as w:
            src = [State.PENDING] if req.is_pending else [State.ISSUED, State.REVEALED]
            if not await store.transition(w.conn, req.id, src, State.EXPIRED, closed_at=now):
                return 0  # someone else got there first
            cur = await _reload(w.conn, req.id)  # `req` was read outside this transaction
            self._audit(w, "breakglass", "expired",
                        {"scope": cur.scope, "was_issued": cur.issued_at is not None}, cur.id,
                        drill=cur.drill)
            if cur.issued_at is not None:
                await self._close_token(w, cur, scope)
            else:
                self._card(w, cur, scope)
                w.rows.append(outbox.post_row(
                    now, cur.requester, blocks.dm_request_expired(cur),
                    lane=dm_lane(cur.requester)))
            self._incident(w, blocks.incident_expired(cur))
        return 1

    async def reconcile_policy(self) -> int:
        """A live token whose grant the running policy no longer covers is revoked, and a
        pending request for a scope that is gone is cancelled (at start and after every
        reload: `reconcile.reconcile_policy`). Returns how many changed."""
        from .governance.reconcile import reconcile_policy

        done = await reconcile_policy(self)
        return done.revoked + done.cancelled

    # -- queries -----------------------------------------------------------------

    async def status(self, user: str) -> list[Request]:
        async with self.db.read() as conn:
            return await store.load_many(conn, store.open_for(user))

    async def scopes_for(self, user: str) -> list[tuple[str, Scope, Sequence[TriggerResult]]]:
        out = []
        for name, scope in sorted(self.policy.scopes.items()):
            if user in await self.directory.members(scope.requesters):
                out.append((name, scope, await self.prober.probe_all(scope.triggers,
                                                                       self.policy.triggers)))
        return out

    async def request(self, request_id: str) -> Request | None:
        async with self.db.read() as conn:
            return await store.load(conn, request_id)

    async def count_requests(self) -> int:
        from sqlalchemy import func

        async with self.db.read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(requests_table)) or 0)


_OPEN = frozenset({State.PENDING, State.ISSUED, State.REVEALED})


async def _reload(conn: AsyncConnection, request_id: str) -> Request:
    req = await store.load(conn, request_id)
    assert req is not None
    return req


def unconfirmed_membership(groups: Sequence[str]) -> Refusal:
    return Refusal("membership_unconfirmed",
                   f"Slack did not answer, so I could not confirm your membership of "
                   f"{', '.join(groups)}; try again in a minute. Nothing was changed.")


def _fmt(td: timedelta) -> str:
    from .core.durations import format_duration

    return format_duration(td)
