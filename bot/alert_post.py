"""An alert (contract §7.5) raised from a use case's transaction: an audit row
`alert` (`{"kind", "text"}`; the audit log's webhook listener turns it into the
webhook `alert` event, §7.6) and an incident-channel post starting with
`:rotating_light:`. The kinds are `bot.core.alerts`'s.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from . import audit, outbox
from .core.alerts import ALERT_PREFIX
from .core.events import ALERT


def alert_event(now: datetime, actor: str, kind: str, text: str,
                request_id: str | None = None) -> audit.AuditEvent:
    """The audit row of an alert; `text` is plain (no mrkdwn), for webhooks and pagers."""
    return audit.AuditEvent(at=now, actor=actor, event=ALERT,
                            details={"kind": kind, "text": text}, request_id=request_id)


def alert_row(now: datetime, channel: str, text: str, key: str | None = None) -> dict[str, Any]:
    """The incident post; `text` is mrkdwn the caller escaped. `key`: the same alert
    from several processes (a reload every replica refuses) is posted once."""
    return outbox.post_row(now, channel, f"{ALERT_PREFIX} *alert* {text}", key=key)
