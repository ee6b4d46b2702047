"""Who may approve, and when enough have.

A click counts only from a member of the scope's approver groups, only once
per person, and never from the requester. One deny closes the request. Once a
request is escalated (``requests.escalate_after`` passed without quorum), the
members of the scope's ``fallback_approvers`` groups count too.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from .domain import Request, State
from .errors import Refusal


@dataclass(frozen=True)
class Tally:
    approvals: tuple[str, ...]
    quorum: int

    @property
    def reached(self) -> bool:
        return len(self.approvals) >= self.quorum

    @property
    def missing(self) -> int:
        return max(0, self.quorum - len(self.approvals))


def eligible_approvers(approvers: Collection[str], requester: str) -> frozenset[str]:
    return frozenset(approvers) - {requester}


def check_reachable(approvers: Collection[str], requester: str, quorum: int, scope: str) -> None:
    """Refuse a request that no set of clicks could ever approve."""
    pool = eligible_approvers(approvers, requester)
    if len(pool) < quorum:
        raise Refusal(
            "quorum_unreachable",
            f"`{scope}` needs {quorum} approvals from people other than you, but its approver "
            f"groups have only {len(pool)} such member(s). Ask an admin to fix the policy.",
        )


def judge_click(request: Request, user: str, approvers: Collection[str], scope_label: str,
                now: datetime | None = None, *, fallback: Collection[str] = (),
                escalated: bool = False, fallback_label: str = "") -> None:
    """Raise a Refusal unless `user` may decide on `request` at `now`.

    A pending request past its `expires_at` is expired whether or not the sweeper has
    closed it yet: a click after the deadline never counts. `fallback` are the members
    of the scope's fallback approver groups: their clicks count only when `escalated`
    (the caller says so; this stays a pure function)."""
    if request.state is not State.PENDING:
        raise Refusal(
            "request_closed",
            f"Request {request.id} is already {request.state.value}: nothing to decide.",
        )
    if now is not None and request.expires_at <= now:
        raise Refusal(
            "request_closed",
            f"Request {request.id} is already expired (its deadline passed): nothing to "
            "decide. The requester can make a new request.",
        )
    if user == request.requester:
        raise Refusal(
            "own_request",
            f"You asked for {request.id} yourself, so your click does not count. "
            "Another approver has to decide.",
        )
    if user not in approvers and user in fallback and not escalated:
        raise Refusal(
            "not_escalated_yet",
            f"You are a fallback approver of `{request.scope}` ({fallback_label}): your click "
            f"counts only once {request.id} is escalated, if {scope_label} have not reached "
            "quorum by then. You will get a DM when it is.",
        )
    if user not in approvers and not (escalated and user in fallback):
        raise Refusal(
            "not_an_approver",
            f"Only members of the approver groups of `{request.scope}` ({scope_label}) "
            "can decide on this request.",
        )
    if user in request.approvals:
        raise Refusal(
            "already_approved",
            f"You already approved {request.id}; each approver counts once.",
        )


def tally(approvals: Collection[str], quorum: int) -> Tally:
    return Tally(tuple(sorted(set(approvals))), quorum)
