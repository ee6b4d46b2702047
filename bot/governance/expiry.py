"""The expiry warning (`[tokens] warn_before`, default 5m).

A little before a token expires, its requester is told when, and how to ask
again: there is no extension without a new approval. With `delivery =
"reveal"` the DM that carried the Reveal button is edited (it keeps its
buttons; the warning stays in it when the token is revealed later); with
`delivery = "message"` a new DM is sent, since editing the old one would take
the token text away while it is still valid.

Once per token across every process: the warning is claimed with a
conditional UPDATE of `warned_at`, in the transaction that queues it. A token
that lives no longer than `warn_before` gets none (its DM already says when it
ends).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from ..audit import AuditEvent
from ..core.domain import State
from ..delivery import outbox
from ..slack import blocks
from ..store import requests as store

if TYPE_CHECKING:
    from ..core.domain import Request
    from ..service import Service

log = logging.getLogger(__name__)


async def warn(service: Service, now: datetime) -> int:
    """Warn about every token that ends within `warn_before`; returns how many."""
    before = service.policy.tokens.warn_before
    async with service.db.read() as conn:
        ending = await store.load_many(conn, store.needs_warning(now, before))
    sent = 0
    for req in ending:  # (a token that lives no longer than the warning is not among them)
        try:
            sent += await _warn_one(service, req, now)
        except Exception:  # noqa: BLE001 - one bad row must not stop the others
            log.exception("could not warn about the expiry of %s", req.id)
    return sent


async def _warn_one(service: Service, req: Request, now: datetime) -> int:
    from ..service import dm_key, dm_lane

    async with service.write() as w:
        if not await store.mark_warned(w.conn, req.id, now):
            return 0  # closed meanwhile, or another process warned
        cur = await store.load(w.conn, req.id)
        assert cur is not None and cur.token_expires_at is not None
        expires_at = cur.token_expires_at
        cur = store.moved(cur, cur.state, warned_at=now)
        lane = dm_lane(cur.requester)
        text = blocks.dm_warning_text(cur)
        if service.policy.tokens.delivery == "message":
            w.rows.append(outbox.post_row(now, cur.requester, text,
                                          blocks.dm_warning_message(cur), lane=lane))
        else:
            dm = blocks.dm_reveal(cur) if cur.state is State.ISSUED else blocks.dm_revealed(cur)
            w.rows.append(outbox.update_row(now, dm_key(cur.id), lane, text, dm))
        w.events.append(AuditEvent(at=now, actor="breakglass", event="expiry_warned", details={
            "scope": cur.scope, "expires_at": expires_at.isoformat(),
            **({"drill": True} if cur.drill else {})},
            request_id=cur.id))
    return 1
