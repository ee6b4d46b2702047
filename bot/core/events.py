"""The names of the events the bot writes to its audit log, and which of them a
`[[webhooks]]` entry may ask for (contract §7.6).

A webhook's `events` list is checked against `WEBHOOK_EVENTS`; an event the bot
audits under a new name must be added here to be sendable. `ALWAYS_SENT` events go
to every webhook whatever its list (the audit checkpoints of contract §6).
"""

from __future__ import annotations

# name -> what it records (docs/policy.md lists them for operators)
WEBHOOK_EVENTS: dict[str, str] = {
    "requested": "a request was opened (the card was posted)",
    "approved": "an approver's click counted",
    "denied": "an approver denied a request",
    "issued": "quorum was reached and a token was issued",
    "revealed": "the requester revealed the token",
    "delivered": "the token was sent in a DM (delivery = \"message\")",
    "used": "a relying service introspected the token (first use, then batches)",
    "revoked": "a token was revoked (by a person, an operator or the policy)",
    "cancelled": "a pending request was cancelled",
    "expired": "a request or a token expired",
    "escalated": "a request waited past escalate_after",
    "refused": "a command or click was refused (repeats are summarised)",
    "alert": "an alert (contract §7.5): also posted to the incident channel",
    "review_opened": "a grant ended; its post-incident review is due (thread under the card)",
    "review_overdue": "a grant's review is overdue",
    "reviewed": "a grant's post-incident review was signed off",
    "checkpoint": "an audit checkpoint (head seq and MAC); sent to every webhook",
    "drill": "a drill's token was revealed: its times (to_card_s, to_quorum_s, to_reveal_s)",
    "drills_due": "once a day: the scopes not rehearsed within [drills] every",
    "expiry_warned": "the requester was warned that the token expires soon",
    "started": "a bot process started",
    "policy_reloaded": "a running process applied a changed policy (SIGHUP or file change)",
    "policy_refused": "a changed policy did not validate; the running one stayed",
    "key_rotated": "a new signing key became current (`breakglass keys rotate`, or a changed "
                   "`tokens.algorithm` at a reload or a start)",
    "master_key_rotated": "`breakglass keys rotate-master` re-encrypted the signing keys",
}

ALWAYS_SENT = frozenset({"checkpoint"})

ALERT = "alert"


def wanted(event: str, listed: frozenset[str] | set[str]) -> bool:
    """Does a webhook that listed `listed` get `event`?"""
    return event in listed or event in ALWAYS_SENT
