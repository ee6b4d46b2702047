"""Live membership (contract §7.3): every `[alerts] membership_recheck` (60 s by
default), a live grant whose holder is no longer in any requester group of its
scope is revoked, with that reason.

Groups are read as they are now: static `members` from the running policy, Slack
user groups asked of Slack afresh (`Directory.resolve(fresh=True)`). A grant is
revoked only on a confirmed answer that its holder left: while Slack fails for
one of the scope's requester groups (or answers only from an old cache), no
grant of that scope is revoked for membership, and the next round tries again.
A Slack outage must not end every grant in the middle of an incident; approvals
are where an unconfirmed membership counts as "not a member" (`Directory`).
Several processes may run this at once: `reconcile.revoke_many` revokes each
grant once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from sqlalchemy import select

from ..core.grants import missing_member
from ..directory import Directory, Membership
from ..store import requests as store
from ..store.schema import requests
from .reconcile import YieldTo, revoke_many

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)


class MembershipRecheck:
    def __init__(self, service: Service, directory: Directory, yield_to: YieldTo = None) -> None:
        self.service = service
        self.directory = directory
        self.yield_to = yield_to
        self.rounds = 0

    async def run_once(self) -> int:
        """One round; returns how many grants this process revoked."""
        policy = self.service.policy
        async with self.service.db.read() as conn:
            live = (await conn.execute(
                select(requests.c.id, requests.c.scope, requests.c.requester)
                .where(store.live_tokens()))).all()
        answers: dict[str, Membership] = {}
        reasons: dict[str, str] = {}
        for row in live:
            scope = policy.scope_named(row.scope)
            if scope is None:
                continue  # a removed scope is the reload's business (reconcile_policy)
            if row.scope not in answers:
                answers[row.scope] = await self.directory.resolve(scope.requesters, fresh=True)
            membership = answers[row.scope]
            if row.requester in membership.members:
                continue
            if not membership.confirmed:
                log.warning("membership of %s in %s not confirmed by Slack; grant %s kept until "
                            "Slack answers", row.requester, ", ".join(scope.requesters), row.id)
                continue
            reasons[row.id] = missing_member(row.scope, scope.requesters)
        self.rounds += 1
        if not reasons:
            return 0
        return await revoke_many(self.service, reasons, actor="membership", yield_to=self.yield_to)

    async def run(self, stop: asyncio.Event) -> None:
        """Every `[alerts] membership_recheck`, read from the running policy at each
        tick, so a reload that shortens it takes effect within a second."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not stop.is_set():
            every = self.service.policy.alerts.membership_recheck.total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.05, min(1.0, last + every - loop.time())))
            if stop.is_set():
                return
            if loop.time() - last < every:
                continue
            last = loop.time()
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 - keep checking
                log.exception("membership re-check failed")
