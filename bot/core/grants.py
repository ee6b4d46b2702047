"""Does a live grant still stand under a policy? Pure: used when the policy changes.

Contract §7.3: after a reload, a live grant is revoked when its scope is gone,
when its scope's audience or permissions no longer cover it, or when its
remaining lifetime exceeds the new ceiling. Each answer is the reason, in words
that go to the audit log, the incident channel and the holder's DM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from .durations import format_duration
from .policy import Policy
from .tokens import DRILL_AUDIENCE


def ceiling(policy: Policy, scope_name: str) -> timedelta | None:
    """The longest a token of `scope_name` may live under `policy` (None: no such scope)."""
    scope = policy.scope_named(scope_name)
    if scope is None:
        return None
    limit = policy.tokens.max_ttl
    return min(limit, scope.max_ttl) if scope.max_ttl is not None else limit


def outlived(policy: Policy, scope_name: str, grant: Mapping[str, Any],
             expires_at: datetime | None, now: datetime, *, drill: bool = False) -> str | None:
    """Why a live grant of `scope_name` no longer stands under `policy`, or None. A
    drill's grant has the drill audience, whatever the scope's."""
    return (outlived_grant(policy, scope_name, grant, drill=drill)
            or outlived_lifetime(policy, scope_name, expires_at, now))


def outlived_grant(policy: Policy, scope_name: str, grant: Mapping[str, Any], *,
                   drill: bool = False) -> str | None:
    """`outlived` for what was granted (scope, audience, permissions), not for how long:
    the same for every grant with the same scope and grant, so a pass over thousands
    of grants can ask once per distinct grant."""
    scope = policy.scope_named(scope_name)
    if scope is None:
        return f"scope {scope_name} was removed from the policy"
    if grant.get("audience") != (DRILL_AUDIENCE if drill else scope.audience):
        return f"the audience of {scope_name} changed"
    granted: Sequence[str] = grant.get("permissions") or []
    if not set(granted) <= set(scope.permissions):
        return f"the permissions of {scope_name} were narrowed"
    return None


def outlived_lifetime(policy: Policy, scope_name: str, expires_at: datetime | None,
                      now: datetime) -> str | None:
    """`outlived` for the time a token has left against its scope's ceiling."""
    limit = ceiling(policy, scope_name)
    if limit is not None and expires_at is not None and expires_at - now > limit:
        return (f"the maximum lifetime of {scope_name} was lowered to {format_duration(limit)}, "
                "less than the token had left")
    return None


def missing_member(scope_name: str, groups: Sequence[str]) -> str:
    """The reason a grant is revoked when its holder left every requester group."""
    return (f"the holder is no longer in any requester group of {scope_name} "
            f"({', '.join(groups)})")
