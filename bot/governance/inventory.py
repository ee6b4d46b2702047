"""Inventory of live grants and operator revocation (contract section 7.2).

`/breakglass tokens` shows every live grant to members of any approver or
reviewer group; `breakglass tokens list` shows the same to operators at the
command line; `breakglass tokens revoke` revokes grants at once, each through
`Service.revoke` (the one revoke path: audited with the operator as actor,
announced in the incident channel, the DM edited, the review thread opened).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..core.domain import Request, State
from ..core.errors import Refusal
from ..service import Service
from ..store import requests as requests_store
from ..store import reviews as store

MAX_LIVE = 100_000


@dataclass(frozen=True)
class LiveGrant:
    request: Request
    uses: int

    def as_dict(self, now: datetime) -> dict[str, object]:
        req = self.request
        assert req.token_expires_at is not None
        return {
            "id": req.id, "jti": req.jti, "requester": req.requester, "scope": req.scope,
            "incident": req.incident, "state": req.state.value,
            "issued_at": req.issued_at.isoformat() if req.issued_at else None,
            "expires_at": req.token_expires_at.isoformat(),
            "expires_in_s": max(0, int((req.token_expires_at - now).total_seconds())),
            "approvers": list(req.approvals), "uses": self.uses,
        }


class Inventory:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def may_view(self, user: str) -> bool:
        policy = self.service.policy
        groups: set[str] = set(policy.reviews.reviewers or ())
        for scope in policy.scopes.values():
            groups.update(scope.approvers)
            groups.update(scope.fallback_approvers)
        return user in await self.service.directory.members(sorted(groups))

    async def live(self) -> list[LiveGrant]:
        """Every live grant, soonest to expire first, with its use count."""
        async with self.service.db.read() as conn:
            grants = await requests_store.load_many(conn, store.live_grants(), limit=MAX_LIVE)
            uses = await store.use_counts(conn, [g.id for g in grants])
        now = self.service.clock.now()
        grants = [g for g in grants if g.token_expires_at is not None and g.token_expires_at > now]
        grants.sort(key=lambda g: (g.token_expires_at, g.id))
        return [LiveGrant(g, uses.get(g.id, 0)) for g in grants]

    async def for_slack(self, user: str) -> list[LiveGrant]:
        if not await self.may_view(user):
            raise await self.service.refuse(user, Refusal(
                "not_allowed_inventory", "Only members of an approver or reviewer group can "
                "list live grants. `/breakglass status` shows your own."), {"action": "tokens"})
        return await self.live()

    # -- operator revocation -----------------------------------------------------------

    async def select(self, ids: list[str], *, user: str | None = None, scope: str | None = None,
                     every: bool = False) -> list[Request]:
        """The grants an operator named. Named IDs must all exist and be open (live, or
        pending: a pending request is cancelled), else ValueError and nothing is chosen."""
        async with self.service.db.read() as conn:
            if ids:
                found: list[Request] = []
                problems = []
                for ident in ids:
                    req = await store.find_grant(conn, ident)
                    if req is None:
                        problems.append(f"there is no request or token `{ident}`")
                    elif req.state not in (State.PENDING, State.ISSUED, State.REVEALED):
                        problems.append(f"{req.id} is already {req.state.value}")
                    elif req.id not in {f.id for f in found}:
                        found.append(req)
                if problems:
                    raise ValueError("; ".join(problems))
                return found
            if user is None and scope is None and not every:
                raise ValueError("name what to revoke: IDs, --user U, --scope S or --all")
            where = store.grants_of(user=user, scope=scope)
            return await requests_store.load_many(conn, where, limit=MAX_LIVE)

    async def revoke(self, grants: list[Request], actor: str, reason: str) -> list[Request]:
        """Revoke each through the service; a grant that ended meanwhile is skipped."""
        done = []
        for req in grants:
            try:
                done.append(await self.service.revoke(req.id, actor, via="cli", reason=reason))
            except Refusal:
                continue  # expired or revoked by someone else meanwhile
        return done
