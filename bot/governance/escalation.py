"""The escalation ladder (`[requests] escalate_after`, a scope's `fallback_approvers`).

A request still pending `escalate_after` after it opened is escalated, once,
across every process (a conditional UPDATE of `escalated_at`), in one
transaction:

1. a reminder in the approval card's thread (the outbox resolves the card's
   `ts` when it sends it) that mentions the approver groups: a Slack user group
   as `<!subteam^ID>`, a group of listed members by its name and its members;
2. from then on the clicks of the scope's fallback approvers count
   (`quorum.judge_click(..., escalated=True)`); the card says so;
3. each fallback approver (but the requester) gets a DM with the card's
   permalink (`chat.getPermalink`, at send time);
4. the requester gets a DM saying who was reminded and asked.

At `expire_after` the request closes as before (`Service.sweep`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from ..audit import AuditEvent
from ..core import quorum
from ..core.policy import Policy
from ..delivery import outbox
from ..slack import blocks
from ..store import requests as store

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)


def mentions(policy: Policy, group_names: list[str], requester: str) -> str:
    """How the reminder names `group_names`: `<!subteam^S…>` for a group with a Slack
    user group, else the group's name and its listed members (not the requester)."""
    parts = []
    for name in group_names:
        group = policy.groups.get(name)
        if group is None:
            continue
        if group.usergroup:
            parts.append(f"<!subteam^{group.usergroup}>")
            continue
        people = " ".join(f"<@{u}>" for u in group.members if u != requester)
        parts.append(f"*{name}*" + (f" ({people})" if people else ""))
    return ", ".join(parts) or "the approvers"


async def escalate(service: Service, now: datetime) -> int:
    """Escalate every request that waited `escalate_after`; returns how many."""
    after = service.policy.requests.escalate_after
    if after is None:
        return 0
    async with service.db.read() as conn:
        waiting = await store.load_many(conn, store.needs_escalation(now - after))
    sent = 0
    for req in waiting:
        try:
            sent += await _escalate_one(service, req.id, req.scope, now)
        except Exception:  # noqa: BLE001 - one bad row must not stop the others
            log.exception("could not escalate %s", req.id)
    return sent


async def _escalate_one(service: Service, request_id: str, scope_name: str,
                        now: datetime) -> int:
    from ..service import card_key, dm_lane

    policy = service.policy
    scope = policy.scope_named(scope_name)
    if scope is None:
        return 0
    fallback = await service.fallback_approvers(scope)  # may ask Slack: outside the transaction
    async with service.write() as w:
        if not await store.mark_escalated(w.conn, request_id, now):
            return 0  # closed meanwhile, or another process escalated it
        req = await store.load(w.conn, request_id)
        assert req is not None
        req = replace(req, escalated_at=now)
        tally = quorum.tally(req.approvals, scope.quorum)
        fallback_label = ", ".join(scope.fallback_approvers)
        asked = sorted(fallback - {req.requester} - set(req.approvals))
        text = blocks.reminder(req, tally, mentions(policy, scope.approvers, req.requester),
                               fallback_label)
        w.events.append(AuditEvent(at=now, actor="breakglass", event="escalated", details={
            "scope": req.scope, "missing": tally.missing, "fallback_approvers": asked,
            **({"drill": True} if req.drill else {})},
            request_id=req.id))
        w.rows.append(outbox.post_row(now, service.reviewer_channel, text,
                                      thread_key=card_key(req.id)))
        service.post_card(w, req, scope)  # "escalated", fallback groups named
        for user in asked:
            w.rows.append(outbox.post_row(
                now, user, blocks.fallback_dm(req, tally, fallback_label), lane=dm_lane(user),
                link_key=card_key(req.id), link_text=f"Open {req.id} in the reviewer channel"))
        w.rows.append(outbox.post_row(
            now, req.requester, blocks.requester_escalated(
                req, tally, ", ".join(scope.approvers), fallback_label),
            lane=dm_lane(req.requester)))
    return 1

