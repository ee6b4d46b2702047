"""Who is in a policy group: static members plus a Slack user group, resolved live.

User group lookups are cached briefly; when Slack cannot answer, the last
known list is used and, failing that, only the static members count: a Slack
outage never widens who may ask or approve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from slack_sdk.web.async_client import AsyncWebClient

from .core.policy import Policy

log = logging.getLogger(__name__)


class Directory:
    def __init__(self, policy: Policy, client: AsyncWebClient | None, ttl: float = 60.0) -> None:
        self.policy = policy
        self.client = client
        self.ttl = ttl
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    async def members(self, groups: Iterable[str]) -> frozenset[str]:
        groups = tuple(groups)
        found = set(self.policy.static_members(groups))
        for usergroup in self.policy.usergroups(groups):
            found |= await self._usergroup(usergroup)
        return frozenset(found)

    async def _usergroup(self, usergroup: str) -> frozenset[str]:
        cached = self._cache.get(usergroup)
        if cached and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        if self.client is None:
            return cached[1] if cached else frozenset()
        try:
            resp = await self.client.usergroups_users_list(usergroup=usergroup)
            users = frozenset(str(u) for u in resp.get("users") or [])
        except Exception as exc:  # noqa: BLE001 - degrade to what we know
            log.warning("could not resolve user group %s: %s", usergroup, exc)
            return cached[1] if cached else frozenset()
        self._cache[usergroup] = (time.monotonic(), users)
        return users
