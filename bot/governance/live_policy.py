"""The one place that owns the running policy.

Every part of the bot that reads the policy (the service, the directory, the
introspector, the Slack handlers, the HTTP layer) holds the same `LivePolicy`
and reads `.policy` from it each time, never a copy of its own. A reload
(`policy_reload.PolicyReloader`) swaps the policy with one assignment: on the
event loop no reader can see half of the old policy and half of the new one,
and once swapped nobody can still be reading the old one.
"""

from __future__ import annotations

import hashlib

from ..core.policy import Policy


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class LivePolicy:
    __slots__ = ("_current",)

    def __init__(self, policy: Policy, text: str = "") -> None:
        self._current: tuple[Policy, str, str] = (policy, text, text_sha256(text))

    @property
    def policy(self) -> Policy:
        return self._current[0]

    @property
    def text(self) -> str:
        return self._current[1]

    @property
    def sha256(self) -> str:
        return self._current[2]

    def swap(self, policy: Policy, text: str) -> Policy:
        """Make `policy` (parsed from `text`) the running one; returns the previous one."""
        previous = self._current[0]
        self._current = (policy, text, text_sha256(text))
        return previous

    @classmethod
    def of(cls, policy: Policy | LivePolicy) -> LivePolicy:
        return policy if isinstance(policy, LivePolicy) else cls(policy)
