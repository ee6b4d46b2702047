"""Who is in a policy group: static members plus a Slack user group, resolved live.

A user group's members are asked of Slack (`usergroups.users.list`) at most once
per `ttl` (60 s). When Slack cannot answer, membership is never assumed:

* an answer Slack gave less than `max_age` (10 minutes) ago is still used;
* an older one, or none, counts as "not a member", and the group is reported as
  *unconfirmed* (`Membership.unconfirmed`), so an approval or a request can be
  refused with "could not confirm your membership of sre-leads; try again"
  instead of "you are not an approver".

The periodic re-check of live grants (`membership.MembershipRecheck`) revokes a
grant only on a confirmed answer that its holder left: `Membership.confirmed` is
False while any of the groups was answered from an old cache or not at all, and
then nothing is revoked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from slack_sdk.web.async_client import AsyncWebClient

from .core.clock import Clock, SystemClock
from .core.policy import Policy

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(seconds=60)
MAX_AGE = timedelta(minutes=10)


class PolicyHolder(Protocol):
    """What holds the running policy (`governance.live_policy.LivePolicy`), read each time
    so a reload is seen; the directory needs nothing else of it."""

    @property
    def policy(self) -> Policy: ...


@dataclass(frozen=True)
class _Fixed:
    policy: Policy


@dataclass(frozen=True)
class Membership:
    members: frozenset[str]
    unconfirmed: tuple[str, ...] = ()
    """Policy groups whose Slack user group could not be read within `max_age`."""
    stale: tuple[str, ...] = ()
    """Policy groups answered from a cache older than `ttl` (Slack failed just now)."""

    @property
    def confirmed(self) -> bool:
        """Slack answered for every group just now (or no group needs Slack)."""
        return not self.unconfirmed and not self.stale


class Directory:
    def __init__(self, policy: Policy | PolicyHolder, client: AsyncWebClient | None,
                 ttl: timedelta = DEFAULT_TTL, *, max_age: timedelta = MAX_AGE,
                 clock: Clock | None = None) -> None:
        self.live: PolicyHolder = _Fixed(policy) if isinstance(policy, Policy) else policy
        self.client = client
        self.ttl = ttl
        self.max_age = max_age
        self.clock = clock or SystemClock()
        self._cache: dict[str, tuple[datetime, frozenset[str]]] = {}

    @property
    def policy(self) -> Policy:
        return self.live.policy

    async def members(self, groups: Iterable[str]) -> frozenset[str]:
        """Everyone confirmed to be in one of `groups`."""
        return (await self.resolve(groups)).members

    async def resolve(self, groups: Iterable[str], *, fresh: bool = False) -> Membership:
        """Members of `groups`, and which groups could not be confirmed. `fresh`: ask
        Slack even when the cached answer is younger than `ttl`."""
        groups = tuple(groups)
        policy = self.policy
        found = set(policy.static_members(groups))
        unconfirmed: list[str] = []
        stale: list[str] = []
        for name in groups:
            group = policy.groups.get(name)
            if group is None or not group.usergroup:
                continue
            users, state = await self._usergroup(group.usergroup, fresh)
            found |= users
            if state == "unconfirmed":
                unconfirmed.append(name)
            elif state == "stale":
                stale.append(name)
        return Membership(frozenset(found), tuple(unconfirmed), tuple(stale))

    async def _usergroup(self, usergroup: str, fresh: bool) -> tuple[frozenset[str], str]:
        now = self.clock.now()
        cached = self._cache.get(usergroup)
        if cached and not fresh and now - cached[0] < self.ttl:
            return cached[1], "fresh"
        if self.client is not None:
            try:
                resp = await self.client.usergroups_users_list(usergroup=usergroup)
                users = frozenset(str(u) for u in resp.get("users") or [])
            except Exception as exc:  # noqa: BLE001 - Slack failed: fall back below
                log.warning("could not resolve user group %s: %s", usergroup, exc)
            else:
                self._cache[usergroup] = (self.clock.now(), users)
                return users, "fresh"
        if cached and now - cached[0] <= self.max_age:
            return cached[1], "stale"
        return frozenset(), "unconfirmed"
